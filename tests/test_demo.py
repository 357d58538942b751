"""The embedded demo: the domain generator, its exact checker, the tokenizer, and the shipped teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention import BasicTransformerBlock
from transformers import CLIPTokenizer

from deltaconv_cli.demo import domain
from deltaconv_cli.demo.extractor import DomainFeatureExtractor
from deltaconv_cli.demo.quality import (
    HELD_OUT_SEED,
    REFERENCE_SEED,
    adherence_by_kind,
    clean_latents,
    failed_facts,
    frechet,
    generator_quality,
    held_out_captions,
    placed_objects,
    position_reliance,
    real_images,
    reconstruction_adherence,
    with_cell_moved,
)
from deltaconv_cli.demo.recommended import RECOMMENDED_GUIDANCE, RECOMMENDED_GUIDANCE_START, RECOMMENDED_STEPS
from deltaconv_cli.demo.text import build_clip_tokenizer
from deltaconv_cli.errors import DeltaConvError
from deltaconv_cli.loading import demo_path, load_model, locate_model
from deltaconv_cli.sampling import SampleSettings, generate
from deltaconv_cli.surgery import trace_token_grids
from teacher import NOISE_SCHEDULE, vocabulary  # the shipped teacher's recipe (demo_teacher/)


def test_generator_is_deterministic():
    a = [domain.make_scene(3, i) for i in range(50)]
    b = [domain.make_scene(3, i) for i in range(50)]
    assert a == b and [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(domain.render(x), domain.render(y)) for x, y in zip(a, b, strict=True))
    assert a != [domain.make_scene(4, i) for i in range(50)]
    assert domain.render(a[0]).shape == (64, 64, 3) and domain.render(a[0]).dtype == np.uint8


def test_every_kind_is_drawn_and_captions_parse_back():
    scenes = [domain.make_scene(0, i) for i in range(400)]
    assert {s.kind for s in scenes} == set(domain.KINDS)
    for scene in scenes:
        kind, objects = domain.parse_caption(scene.caption)
        assert kind == scene.kind
        assert [(o.color, o.shape) for o in objects] == [(o.color, o.shape) for o in scene.objects]
        if kind in ("single", "pair"):
            assert [o.cell for o in objects] == [o.cell for o in scene.objects]


def test_mirror_scenes_are_mirror_symmetric():
    for i in range(100):
        scene = domain.make_scene(1, i, "mirror")
        image = domain.render(scene)
        assert np.abs(image.astype(int) - image[:, ::-1].astype(int)).max() <= 1


def test_checker_scores_ground_truth_one():
    scenes = [domain.make_scene(5, i) for i in range(300)]
    assert [domain.check(domain.render(s), s.caption) for s in scenes] == [1.0] * 300


def test_checker_scores_mismatched_captions_low():
    scores = [
        domain.check(domain.render(domain.make_scene(5, i)), domain.make_scene(6, i).caption)
        for i in range(300)
    ]
    assert np.mean(scores) < 0.3
    assert np.mean(np.array(scores) == 1.0) < 0.02


def test_checker_catches_wrong_counts_and_broken_symmetry():
    three = domain.make_scene(0, 0, "count")
    wanted = len(three.objects)
    other = {2: "three", 3: "four", 4: "two"}[wanted]
    caption = three.caption.replace(domain.NUMBERS[wanted], other, 1)
    assert domain.check(domain.render(three), three.caption) == 1.0
    assert domain.check(domain.render(three), caption) == 0.0  # wrong count: count and total facts fail
    mirror = domain.make_scene(0, 0, "mirror")
    left, right = mirror.objects
    moved = domain.Scene("mirror", (left, domain.SceneObject(right.color, right.shape, (right.cell + 3) % 9)))
    assert domain.check(domain.render(moved), mirror.caption) < 1.0
    assert domain.check(domain.render(domain.Scene("single", ())), "a red circle at the top") == 0.0


def test_placed_objects_separates_position_errors_from_missing_objects():
    scene = domain.Scene("single", (domain.SceneObject("red", "circle", 0),))
    moved = domain.Scene("single", (domain.SceneObject("red", "circle", 8),))
    count = domain.make_scene(0, 0, "count")  # names no cell: not counted
    images = [domain.render(s) for s in (scene, moved, count)]
    caption = "a red circle at the top left"
    captions = [caption, caption, count.caption]
    assert placed_objects(images, captions) == {"objects": 2, "drawn": 1.0, "in_named_cell": 0.5}
    wrong_colour = placed_objects(images[:1], ["a blue circle at the top left"])
    assert wrong_colour == {"objects": 1, "drawn": 0.0, "in_named_cell": 0.0}


def test_facts_say_why_a_named_object_fails():
    def facts_of(objects: tuple[tuple[str, str, int], ...], caption: str) -> list[tuple[bool, str]]:
        scene = domain.Scene("single", tuple(domain.SceneObject(*o) for o in objects))
        return domain.facts(domain.render(scene), caption)

    caption = "a red circle at the top left"
    assert facts_of((("red", "circle", 0),), caption) == [(True, ""), (True, "")]
    assert facts_of((("red", "square", 0),), caption) == [(False, "wrong shape"), (True, "")]
    assert facts_of((("blue", "circle", 0),), caption) == [(False, "wrong colour"), (True, "")]
    assert facts_of((("red", "circle", 8),), caption) == [(False, "wrong cell"), (True, "")]
    assert facts_of((("green", "square", 8),), caption) == [(False, "not drawn"), (True, "")]
    two = (("red", "circle", 0), ("blue", "square", 8))
    assert facts_of(two, caption) == [(True, ""), (False, "extra objects")]
    assert facts_of((), caption) == [(False, "not drawn"), (False, "missing objects")]
    pair = "a red circle at the top left and a blue square at the bottom right"
    assert facts_of(two, pair) == [(True, ""), (True, ""), (True, "")]


def test_facts_of_count_and_mirror_captions_and_their_tally():
    three = domain.make_scene(0, 1, "count")
    assert three.caption == "three cyan triangles"
    fewer = three.caption.replace("three", "four", 1)
    image = domain.render(three)
    assert domain.facts(image, fewer) == [(False, "wrong number"), (False, "missing objects")]
    mirror = domain.make_scene(0, 0, "mirror")
    left, right = mirror.objects
    moved = domain.Scene("mirror", (left, domain.SceneObject(right.color, right.shape, (right.cell + 3) % 9)))
    moved_facts = domain.facts(domain.render(moved), mirror.caption)
    assert moved_facts == [(True, ""), (False, "not mirrored"), (True, "")]
    tally = failed_facts([image, image, domain.render(moved)], [three.caption, fewer, mirror.caption])
    assert tally == {
        "facts": 7,
        "hold": 4,
        "wrong shape": 0,
        "wrong colour": 0,
        "wrong cell": 0,
        "not drawn": 0,
        "wrong number": 1,
        "not mirrored": 1,
        "extra objects": 0,
        "missing objects": 1,
    }
    assert set(tally) == {"facts", "hold", *domain.FAILURES}


def test_with_cell_moved_names_the_same_object_elsewhere():
    assert with_cell_moved("a red circle at the top left", 1) == "a red circle at the top"
    assert with_cell_moved("a red circle at the top left", 4) == "a red circle in the center"
    assert with_cell_moved("a blue square at the bottom right", 1) == "a blue square at the top left"
    assert with_cell_moved("a blue square in the center", 9) == "a blue square in the center"
    with pytest.raises(ValueError, match="not a single-object caption"):
        with_cell_moved("two red circles mirrored", 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_latents_inverts_the_noising_for_each_prediction_type(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    noisy = scheduler.add_noise(x0, noise, t)
    exact = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    recovered = clean_latents(exact[prediction_type], noisy, alpha, prediction_type)
    # float32 rounding, amplified 15x at t = 999 for epsilon
    torch.testing.assert_close(recovered, x0, atol=1e-4, rtol=1e-4)


def test_position_reliance_measures_clean_latent_error_per_timestep():
    pipe = load_model(locate_model("demo"))
    result = position_reliance(pipe, count=6, timesteps=(999, 0))
    assert list(result) == ["999", "0"]
    assert all(list(errors) == ["own_caption", "moved_caption"] for errors in result.values())
    # At t = 0 the latents are all but clean, so a correct conversion to clean latents nearly recovers them.
    assert 0 < result["0"]["own_caption"] < 0.05 * result["999"]["own_caption"]


def test_generator_quality_samples_caption_i_from_seed_first_seed_plus_i():
    pipe = load_model(locate_model("demo"))
    pipe.set_progress_bar_config(disable=True)
    extractor = DomainFeatureExtractor.from_pretrained(demo_path("extractor"))
    settings = SampleSettings(steps=2, guidance=2.0)
    quality = generator_quality(pipe, extractor, settings, count=3, first_seed=5)
    captions, _ = held_out_captions(3)
    assert quality["first_seed"] == 5 and quality["sample_captions"] == captions
    assert np.array_equal(quality["samples"], generate(pipe, captions, [5, 6, 7], (64, 64), settings))
    assert not np.array_equal(quality["samples"], generate(pipe, captions, [0, 1, 2], (64, 64), settings))


def test_generator_quality_draws_other_held_out_captions_from_another_caption_seed():
    pipe = load_model(locate_model("demo"))
    pipe.set_progress_bar_config(disable=True)
    extractor = DomainFeatureExtractor.from_pretrained(demo_path("extractor"))
    settings = SampleSettings(steps=1, guidance=2.0)
    other_seed = HELD_OUT_SEED + 1
    quality = generator_quality(pipe, extractor, settings, count=4, caption_seed=other_seed)
    captions, _ = held_out_captions(4, other_seed)
    assert quality["caption_seed"] == other_seed and quality["sample_captions"] == captions
    assert captions != held_out_captions(4)[0]


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        (1, "caption seed must be >= 10000019 (the seeds below train the teacher), got 1"),
        (
            REFERENCE_SEED + 3,
            "caption seed 20000006 draws the real images Fréchet distances compare with "
            "(20000003 to 20000006); choose another",
        ),
    ],
)
def test_generator_quality_refuses_captions_that_train_the_teacher_or_are_the_fd_reference(seed, message):
    with pytest.raises(DeltaConvError) as refused:
        generator_quality(None, None, SampleSettings(steps=1), count=4, caption_seed=seed)
    assert str(refused.value) == message


def test_shipped_vae_reconstructions_keep_nearly_every_fact():
    pipe = load_model(locate_model("demo"))
    result = reconstruction_adherence(pipe, count=64)
    tally = result["failed_facts"]
    assert set(tally) == {"facts", "hold", *domain.FAILURES}
    assert tally["facts"] - tally["hold"] == sum(tally[reason] for reason in domain.FAILURES)
    # Teacher v2's VAE keeps 0.944 on 200 held-out scenes (demo_teacher/REPORT.md); the room is for
    # another CPU's kernels flipping a few pixels at an object's edge.
    assert result["adherence"]["all"] >= 0.85


def test_tokenizer_spells_every_word_as_one_token(tmp_path):
    tokenizer = build_clip_tokenizer(vocabulary(), tmp_path / "files", 24)
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    for word in vocabulary():
        assert reloaded.tokenize(word) == [word + "</w>"]
    caption = "a purple triangle at the bottom left and a cyan circle at the bottom right"
    assert len(reloaded(caption).input_ids) == 2 + len(caption.split())


def test_extractor_ships_and_separates_domains():
    extractor = DomainFeatureExtractor.from_pretrained(demo_path("extractor"))
    images = real_images(7, 300)
    assert extractor.features(torch.zeros(2, 3, 64, 64)).shape == (2, 64)
    assert frechet(extractor, images, images) == pytest.approx(0.0, abs=1e-6)
    floor = frechet(extractor, images, real_images(8, 300))
    between = frechet(extractor, real_images(9, 300, "single"), real_images(10, 300, "count"))
    assert between > 3 * floor  # measured: 786 vs 168


def test_shipped_teacher_has_self_and_cross_attention_on_the_16x16_and_8x8_grids():
    # v3 has no attention on the 32 x 32 latent grid (TeacherRecipe.full_resolution_attention)
    unet = UNet2DConditionModel.from_pretrained(demo_path() / "unet")
    grids = trace_token_grids(unet, 32, 32)
    assert sorted(grids.values()) == [(8, 8), (16, 16), (16, 16), (16, 16)]
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert all(b.attn2 is not None for b in blocks)  # every self-attention site has cross-attention too
    assert len(blocks) == len(grids)


def test_shipped_teacher_samples_from_pure_noise_and_predicts_v():
    # The layout must come from the caption: no signal may be left at t = 999, and sampling starts there.
    scheduler = DPMSolverMultistepScheduler.from_pretrained(demo_path(), subfolder="scheduler")
    assert {k: scheduler.config[k] for k in NOISE_SCHEDULE} == NOISE_SCHEDULE
    assert DDPMScheduler.from_config(scheduler.config).alphas_cumprod[-1] == 0
    scheduler.set_timesteps(RECOMMENDED_STEPS)
    assert int(scheduler.timesteps[0]) == 999


@pytest.mark.slow
def test_shipped_teacher_loads_like_a_user_checkpoint_and_follows_prompts():
    folder = locate_model("demo")
    assert folder.is_pipeline and folder.vae_factor == 2
    pipe = load_model(folder)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.config.sample_size >= 32
    pipe.set_progress_bar_config(disable=True)
    captions, kinds = held_out_captions(48)
    settings = SampleSettings().for_model("demo")  # the recommended sampler
    assert (settings.guidance, settings.guidance_start) == (RECOMMENDED_GUIDANCE, RECOMMENDED_GUIDANCE_START)
    images = generate(pipe, captions, list(range(48)), (64, 64), settings)
    own = adherence_by_kind(images, captions, kinds)["all"]
    # The same images scored against the next image's caption: what ignoring the prompt would score.
    shifted = adherence_by_kind(images, captions[1:] + captions[:1], kinds[1:] + kinds[:1])["all"]
    print(f"adherence {own:.3f}, against shifted captions {shifted:.3f}")
    # Teacher v5 measures 0.847 here against 0.142 shifted (AMD EPYC), and 0.829 on 200 held-out captions
    # (demo_teacher/REPORT.md, issue 14's bar: 0.8); v4 measured 0.816 against 0.142, v3 0.830, v2 0.542
    # against 0.135. This guards v5's level with room for another CPU's kernels to flip a few of the 48
    # captions' facts (0.04 is about 5 of them).
    assert own >= 0.8
    assert own >= shifted + 0.5
    # Issue 14's bar: naming the object in another cell raises the clean-latent error at t = 999 by 25 %
    # (v5: 4.32 on these 16 scenes, 4.16 on 64; v4: 4.33 and 4.16; v3: 4.28 and 4.12; v2: 5.29 on 64;
    # v1: 0.999).
    errors = position_reliance(pipe, count=16, timesteps=(999,))["999"]
    assert errors["moved_caption"] >= 1.25 * errors["own_caption"]


@pytest.mark.parametrize(
    ("cells", "layout"),
    [((3, 5), "mirrored"), ((6, 8), "mirrored"), ((0, 8), "two rows"), ((5, 6), "two rows"),
     ((3, 4), "elsewhere"), ((0, 6), "elsewhere")],
)  # fmt: skip
def test_pair_layout_tells_a_mirrored_pair_from_one_across_two_rows(cells, layout):
    found = [domain.Detected("red", "circle", cell, domain.cell_center(cell), 100) for cell in cells]
    assert domain.pair_layout(found) == layout


def test_guidance_from_the_start_is_the_documented_sampler_and_from_the_end_is_unguided():
    pipe = load_model(locate_model("demo"))
    pipe.set_progress_bar_config(disable=True)
    captions, seeds = held_out_captions(2)[0], [0, 1]

    def sampled(guidance: float, start: float = 0.0) -> np.ndarray:
        settings = SampleSettings(3, guidance, guidance_start=start)
        return np.stack(generate(pipe, captions, seeds, (64, 64), settings))

    guided = sampled(2.0)
    # Unguided steps keep the caption-free half of the batch at weight 1e-6: plain conditional sampling
    # up to the kernels a batch of another size picks (a grey level or two).
    unguided, conditional = sampled(2.0, 1.0).astype(int), sampled(1.0).astype(int)
    assert np.abs(unguided - conditional).max() <= 2
    assert np.abs(guided.astype(int) - conditional).max() > 20
