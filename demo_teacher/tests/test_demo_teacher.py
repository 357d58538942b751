"""The demo teacher's training recipe: the text encoder's auxiliary task and the resumable UNet stage."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import tiny_denoiser

import teacher
from deltaconv_cli.demo import domain
from deltaconv_cli.errors import DeltaConvError
from deltaconv_cli.progress import progress_bar
from deltaconv_cli.sampling import SCHEDULERS
from teacher import (
    MIRRORED,
    NO_CELL,
    SETTINGS_BEFORE_RECORDED,
    TEXT_LENGTH,
    TeacherRecipe,
    build_components,
    phrase_facts,
    train_denoiser,
    train_text_encoder,
)

pytestmark = pytest.mark.slow  # trains the teacher's stages and runs its scripts in subprocesses

RED, BLUE, GREEN = (list(domain.COLORS).index(c) for c in ("red", "blue", "green"))
CIRCLE, SQUARE, TRIANGLE = range(3)


def test_phrase_facts_name_each_object_phrase_at_its_last_word():
    # Token 0 is BOS, so word i is token i + 1; the state at a phrase's last word has seen all of it.
    assert phrase_facts("a red circle at the top left") == ([7], [(RED, CIRCLE, 0, 0)])
    assert phrase_facts("a red circle in the center and a blue square at the bottom right") == (
        [6, 14],
        [(RED, CIRCLE, 4, 0), (BLUE, SQUARE, 8, 0)],
    )
    assert phrase_facts("three green triangles") == ([3], [(GREEN, TRIANGLE, NO_CELL, 2)])
    assert phrase_facts("two blue squares mirrored") == ([4], [(BLUE, SQUARE, NO_CELL, 1)])
    # With mirror_class a mirror phrase says what sets it apart from the count phrase "two blue squares".
    assert phrase_facts("two blue squares mirrored", True) == ([4], [(BLUE, SQUARE, MIRRORED, 1)])
    assert phrase_facts("two blue squares", True) == ([3], [(BLUE, SQUARE, NO_CELL, 1)])


@pytest.mark.parametrize("mirror_class", [False, True])
def test_text_encoder_stage_makes_the_cell_of_each_object_readable(tmp_path: Path, mirror_class: bool):
    recipe = TeacherRecipe(text_steps=300, mirror_class=mirror_class)
    parts = build_components(recipe, tmp_path)
    captions = [domain.make_scene(0, i).caption for i in range(4000)]
    held_out = [domain.make_scene(1, i).caption for i in range(500)]
    with progress_bar() as progress:
        encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
        accuracy = train_text_encoder(encoder, tokenizer, captions, held_out, recipe, progress)
    # Measured: 1.0 for every fact (pairs included: each phrase's cell, not just the caption's last one).
    assert accuracy["cell"] >= 0.95, accuracy
    assert min(accuracy.values()) >= 0.95, accuracy


def _train(parts: dict, latents: torch.Tensor, captions: list[str], recipe: TeacherRecipe, checkpoint: Path):
    with progress_bar() as progress:
        models = parts["unet"], parts["text_encoder"], parts["tokenizer"]
        train_denoiser(*models, latents, captions, recipe, progress, checkpoint)
    return {k: v.clone() for k, v in parts["unet"].state_dict().items()}


def test_unet_stage_keeps_the_text_encoder_frozen_and_resumes_exactly(tmp_path: Path, monkeypatch):
    recipe = TeacherRecipe(steps=4, batch=2, warmup=1, checkpoint_every=2)
    captions = [domain.make_scene(0, i).caption for i in range(8)]
    latents = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    whole = build_components(recipe, tmp_path / "a")
    encoder_before = {k: v.clone() for k, v in whole["text_encoder"].state_dict().items()}
    unet_before = {k: v.clone() for k, v in whole["unet"].state_dict().items()}
    uninterrupted = _train(whole, latents, captions, recipe, tmp_path / "a" / "checkpoint")
    encoder_after = whole["text_encoder"].state_dict()
    assert all(torch.equal(encoder_after[k], v) for k, v in encoder_before.items())
    assert not all(torch.equal(uninterrupted[k], v) for k, v in unet_before.items())

    # Interrupted after the checkpoint at step 2, then run again from fresh components: the same weights.
    calls = []

    def interrupt_at_step_3(*args: object) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "b" / "checkpoint"
    monkeypatch.setattr(teacher, "advance", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _train(build_components(recipe, tmp_path / "b"), latents, captions, recipe, checkpoint)
    monkeypatch.undo()
    assert checkpoint.exists()
    resumed = _train(build_components(recipe, tmp_path / "b"), latents, captions, recipe, checkpoint)
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())


def test_mixed_precision_bf16_runs_the_unet_in_bfloat16_and_keeps_its_weights_in_float32(tmp_path: Path):
    captions = [domain.make_scene(0, i).caption for i in range(8)]
    latents = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    trained, seen = {}, {}
    for precision in teacher.MIXED_PRECISION:
        recipe = TeacherRecipe(steps=2, batch=2, warmup=1, mixed_precision=precision)
        parts = build_components(recipe, tmp_path / precision)
        parts["unet"].conv_in.register_forward_hook(
            lambda _m, _i, out, p=precision: seen.setdefault(p, out.dtype) and None  # keeps the output
        )
        trained[precision] = _train(parts, latents, captions, recipe, tmp_path / precision / "checkpoint")
    assert seen == {"no": torch.float32, "bf16": torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in trained["bf16"].values())
    # Same start and batches; the steps differ only by bfloat16 rounding in the forward pass.
    changed = [k for k, v in trained["no"].items() if not torch.equal(v, trained["bf16"][k])]
    assert changed
    for k in changed:
        torch.testing.assert_close(trained["bf16"][k], trained["no"][k], atol=1e-2, rtol=0)


def test_kind_shares_set_the_share_of_each_caption_kind_in_the_unet_batches(tmp_path: Path):
    captions = [domain.make_scene(0, i).caption for i in range(200)]
    kinds = [domain.parse_caption(caption)[0] for caption in captions]
    shares = (0.1, 0.2, 0.3, 0.4)
    weights = teacher._scene_weights(captions, shares)
    for kind, share in zip(domain.KINDS, shares, strict=True):
        of_kind = torch.tensor([k == kind for k in kinds])
        assert float(weights[of_kind].sum()) == pytest.approx(share, abs=1e-12)

    # Mirror scenes alone: every caption the UNet stage encodes is a mirror caption.
    recipe = TeacherRecipe(steps=3, batch=4, warmup=1, caption_dropout=0.0, kind_shares=(0, 0, 0, 1))
    parts = build_components(recipe, tmp_path)
    encoded = []
    encode = parts["text_encoder"].forward

    def recording_encoder(ids: torch.Tensor, *args: object, **kwargs: object):
        encoded.extend(parts["tokenizer"].batch_decode(ids, skip_special_tokens=True))
        return encode(ids, *args, **kwargs)

    parts["text_encoder"].forward = recording_encoder
    latents = torch.randn(len(captions), 4, 32, 32, generator=torch.Generator().manual_seed(0))
    _train(parts, latents, captions, recipe, tmp_path / "checkpoint")
    assert len(encoded) == 12 and all(caption.endswith(" mirrored") for caption in encoded), encoded


def test_kind_shares_for_a_kind_the_training_scenes_lack_are_refused():
    singles_and_pairs = [domain.make_scene(0, i, ("single", "pair")[i % 2]).caption for i in range(6)]
    with pytest.raises(DeltaConvError) as refused:
        teacher._scene_weights(singles_and_pairs, (0.5, 0.25, 0.25, 0))
    assert str(refused.value) == "kind_shares gives count scenes 0.25 of every batch, but none were rendered"
    assert float(teacher._scene_weights(singles_and_pairs, (0.5, 0.5, 0, 0)).sum()) == pytest.approx(1.0)


def test_kind_shares_the_rendered_scenes_cannot_fill_are_refused_before_the_vae_trains(tmp_path: Path):
    rendered = domain.make_scene(TeacherRecipe.seed, 0).kind
    other = next(kind for kind in domain.KINDS if kind != rendered)
    shares = tuple(float(kind == other) for kind in domain.KINDS)
    work = tmp_path / "work"
    with pytest.raises(DeltaConvError) as refused:
        teacher.train_teacher(tmp_path / "out", TeacherRecipe(train_scenes=1, kind_shares=shares), work=work)
    message = f"kind_shares gives {other} scenes 1.0 of every batch, but none were rendered"
    assert str(refused.value) == message
    assert not (work / "vae").exists() and not (tmp_path / "out").exists()


def test_a_work_folder_of_another_recipe_is_refused_before_any_stage_runs(tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipe.json").write_text(json.dumps(asdict(TeacherRecipe(vae_steps=600, mirror_class=False))))
    with pytest.raises(
        DeltaConvError, match=r"holds stages of another recipe \(vae_steps, mirror_class differ\)"
    ):
        teacher.train_teacher(tmp_path / "out", TeacherRecipe(), work=work)
    assert sorted(p.name for p in work.iterdir()) == ["recipe.json"] and not (tmp_path / "out").exists()


def test_a_work_folder_from_before_a_setting_existed_counts_what_ran_before_it(tmp_path: Path, monkeypatch):
    # A folder recorded before kind_shares existed drew the UNet's scenes uniformly (v3's did), one before
    # full_resolution_attention had attention at 32 x 32: today's defaults would mix two recipes in it.
    work = tmp_path / "work"
    work.mkdir()
    earlier = asdict(TeacherRecipe(mirror_class=True))
    for setting in SETTINGS_BEFORE_RECORDED:
        del earlier[setting]
    (work / "recipe.json").write_text(json.dumps(earlier))
    with pytest.raises(
        DeltaConvError, match=r"\(kind_shares, full_resolution_attention, mixed_precision differ\)"
    ):
        teacher.train_teacher(tmp_path / "out", TeacherRecipe(mirror_class=True), work=work)

    def stop(*_: object) -> None:
        raise RuntimeError("past the recipe check")

    monkeypatch.setattr(teacher, "build_components", stop)
    what_ran = TeacherRecipe(
        mirror_class=True, full_resolution_attention=True, kind_shares=(), mixed_precision="no"
    )
    assert TeacherRecipe.read(work / "recipe.json") == what_ran
    with pytest.raises(RuntimeError, match="past the recipe check"):
        teacher.train_teacher(tmp_path / "out", what_ran, work=work)


def test_attention_heads_set_the_heads_of_each_level(tmp_path: Path):
    recipe = TeacherRecipe(attention_heads=(1, 4, 2), full_resolution_attention=True)
    unet = build_components(recipe, tmp_path)["unet"]
    heads = {name: module.heads for name, module in unet.named_modules() if name.endswith(("attn1", "attn2"))}
    assert {heads[n] for n in heads if n.startswith(("down_blocks.0", "up_blocks.2"))} == {1}
    assert {heads[n] for n in heads if n.startswith(("down_blocks.1", "up_blocks.1"))} == {4}
    assert {heads[n] for n in heads if n.startswith("mid_block")} == {2}
    assert len(heads) == 14  # self- and cross-attention in 7 transformer blocks


def test_lowest_resolution_attention_adds_attention_to_the_8_by_8_blocks(tmp_path: Path):
    recipe = TeacherRecipe(attention_heads=(1, 4, 2), lowest_resolution_attention=True)
    unet = build_components(recipe, tmp_path)["unet"]
    heads = {name: module.heads for name, module in unet.named_modules() if name.endswith(("attn1", "attn2"))}
    assert {name.split(".attentions")[0] for name in heads} == {
        *("down_blocks.1", "up_blocks.1", "mid_block", "down_blocks.2", "up_blocks.0")
    }
    assert {heads[n] for n in heads if n.startswith(("down_blocks.2", "up_blocks.0", "mid_block"))} == {2}
    assert len(heads) == 14  # 4 transformer blocks at 16 x 16 and in the middle, 3 in the 8 x 8 blocks
    assert unet(
        torch.randn(1, 4, 32, 32), 999, torch.randn(1, TEXT_LENGTH, recipe.text_width)
    ).sample.shape == (1, 4, 32, 32)


def test_the_shipped_recipe_has_attention_everywhere_but_at_32_by_32(tmp_path: Path):
    recipe = TeacherRecipe()
    unet = build_components(recipe, tmp_path)["unet"]
    attention = [name for name, module in unet.named_modules() if name.endswith(("attn1", "attn2"))]
    levels = {name.split(".attentions")[0] for name in attention}
    assert levels == {"down_blocks.1", "up_blocks.1", "mid_block"}
    assert len(attention) == 8  # self- and cross-attention in 4 transformer blocks
    full = build_components(replace(recipe, full_resolution_attention=True), tmp_path / "full")["unet"]
    assert {name.split(".attentions")[0] for name in full.attn_processors} == levels | {
        "down_blocks.0",
        "up_blocks.2",
    }
    assert unet(
        torch.randn(1, 4, 32, 32), 999, torch.randn(1, TEXT_LENGTH, recipe.text_width)
    ).sample.shape == (1, 4, 32, 32)


def test_the_default_recipe_is_the_one_the_shipped_teacher_recorded():
    # train_demo_teacher.py with no settings reproduces the shipped weights' recipe.
    shipped = Path(__file__).resolve().parents[2] / "deltaconv_cli" / "assets" / "demo" / "recipe.json"
    assert TeacherRecipe.read(shipped) == TeacherRecipe()


KIND_SHARES_MESSAGE = "kind_shares takes 4 shares >= 0 summing to 1 (single, pair, count, mirror)"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"attention_heads": (1, 4)}, "attention_heads takes three whole numbers > 0, got [1, 4]"),
        ({"unet_channels": (48, 0, 96)}, "unet_channels takes three whole numbers > 0, got [48, 0, 96]"),
        ({"unet_channels": (40, 96, 96)}, "unet_channels must be multiples of 16, got [40, 96, 96]"),
        (
            {"attention_heads": (1, 5, 4)},
            "attention_heads [1, 5, 4] must divide unet_channels [48, 96, 96] level by level",
        ),
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"warmup": 0}, "warmup must be at least 1, got 0"),
        ({"lr": -1e-4}, "lr must be > 0, got -0.0001"),
        ({"vae_object_weight": float("nan")}, "vae_object_weight must be > 0, got nan"),
        ({"caption_dropout": 1.0}, "caption_dropout must be in [0, 1), got 1.0"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"high_noise_from": 1000}, "high_noise_from must be a timestep in [0, 999], got 1000"),
        ({"text_width": 95}, "text_width must be a multiple of the text encoder's 2 heads"),
        ({"mixed_precision": "fp16"}, "mixed_precision must be one of no, bf16, got 'fp16'"),
        *(
            ({"kind_shares": shares}, f"{KIND_SHARES_MESSAGE}, got {list(shares)}")
            for shares in [(0.5, 0.5), (0.5, 0.5, 0.5, -0.5), (0.2, 0.2, 0.2, 0.2), (1, 0, 0, "mirror")]
        ),
    ],
)
def test_a_setting_the_recipe_cannot_train_with_is_refused_with_one_line(settings: dict, message: str):
    with pytest.raises(DeltaConvError) as refused:
        TeacherRecipe(**settings)
    assert str(refused.value) == message


def test_a_recorded_recipe_reads_back_as_the_recipe_that_wrote_it(tmp_path: Path):
    recipe = TeacherRecipe(
        unet_channels=(32, 64, 64), attention_heads=(1, 4, 4), vae_object_weight=3.0, mirror_class=True
    )
    (tmp_path / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    assert TeacherRecipe.read(tmp_path / "recipe.json") == recipe


def test_a_recorded_recipe_with_a_setting_this_recipe_lacks_is_one_line(tmp_path: Path):
    (tmp_path / "recipe.json").write_text(json.dumps(asdict(TeacherRecipe()) | {"unet_depth": 2}))
    with pytest.raises(DeltaConvError) as refused:
        TeacherRecipe.read(tmp_path / "recipe.json")
    assert (
        str(refused.value)
        == f"{tmp_path / 'recipe.json'} records settings this recipe does not have: unet_depth"
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"seed": 0, "vae_st', "Unterminated string"),
        ("[1, 2]", "not a JSON object"),
        ('{"steps": "many"}', "not supported between instances of 'str' and 'int'"),
    ],
)
def test_a_broken_recipe_json_in_a_work_folder_is_refused_in_one_line(tmp_path: Path, text: str, why: str):
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipe.json").write_text(text)
    with pytest.raises(DeltaConvError) as refused:
        teacher.train_teacher(tmp_path / "out", TeacherRecipe(), work=work)
    message = str(refused.value)
    assert message.startswith(f"{work / 'recipe.json'} is not a recipe recorded by train_teacher: ")
    assert why in message and "\n" not in message
    assert sorted(p.name for p in work.iterdir()) == ["recipe.json"] and not (tmp_path / "out").exists()


SCRIPTS = Path(__file__).resolve().parents[1]  # demo_teacher/


def test_evaluate_demo_teacher_grids_every_caption_when_given_fewer_than_sixteen(tmp_path: Path):
    grid, results = tmp_path / "grid.png", tmp_path / "quality.json"
    command = [sys.executable, str(SCRIPTS / "evaluate_demo_teacher.py"), "--count", "3", "--steps", "1",
               "--grid", str(grid), "--json", str(results)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(results.read_text())[0]["captions"] == 3
    image = Image.open(grid)  # two columns of 128 px images; three rows of them, with their captions
    assert image.width == 2 * (64 * 2 + 2) and image.height > 3 * 64 * 2


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        (
            "layout_at_t999.py",
            ["--pipeline", "{tmp}/missing"],
            "layout_at_t999.py: no such folder: {tmp}/missing",
        ),
        (
            "evaluate_demo_teacher.py",
            ["--extractor", "{tmp}"],
            "evaluate_demo_teacher.py: {tmp} is not a feature extractor folder: it has no config.json",
        ),
        (
            "evaluate_demo_teacher.py",
            ["--scheduler", "fastest"],
            f"evaluate_demo_teacher.py: unknown scheduler 'fastest'; choose one of {', '.join(SCHEDULERS)}",
        ),
        (
            "evaluate_demo_teacher.py",
            ["--caption-seed", "1"],
            "evaluate_demo_teacher.py: caption seed must be >= 10000019 (the seeds below train the teacher), "
            "got 1",
        ),
        (
            "evaluate_demo_teacher.py",
            ["--caption-seed", "20000005"],
            "evaluate_demo_teacher.py: caption seed 20000005 draws the real images Fréchet distances compare "
            "with (20000003 to 20000006); choose another",
        ),
        (
            "evaluate_demo_teacher.py",
            ["--guidance-rescale", "2"],
            "evaluate_demo_teacher.py: guidance rescale must be in [0, 1], got 2.0",
        ),
        (
            "vae_reconstruction.py",
            ["--pipeline", "demo", "{tmp}/missing"],
            "vae_reconstruction.py: no such folder: {tmp}/missing",
        ),
        (
            "count_histogram.py",
            ["--scheduler", "fastest", "--json", "{tmp}/counts.json"],
            f"count_histogram.py: unknown scheduler 'fastest'; choose one of {', '.join(SCHEDULERS)}",
        ),
        (
            "count_histogram.py",
            ["--guidance-rescale", "-1", "--json", "{tmp}/counts.json"],
            "count_histogram.py: guidance rescale must be in [0, 1], got -1.0",
        ),
        (
            "train_demo_teacher.py",
            ["--out", "{tmp}/out", "--work", "{tmp}/work", "--set", "attention_heads=[1,5,4]"],
            "train_demo_teacher.py: attention_heads [1, 5, 4] must divide unet_channels [48, 96, 96] "
            "level by level",
        ),
        (
            "train_demo_teacher.py",
            ["--out", "{tmp}/out", "--work", "{tmp}/work", "--set", "mixed_precision=fp16"],
            "train_demo_teacher.py: mixed_precision must be one of no, bf16, got 'fp16'",
        ),
        (
            "train_demo_teacher.py",
            ["--out", "{tmp}/out", "--work", "{tmp}/work", "--steps", "-5"],
            "train_demo_teacher.py: steps must be at least 1, got -5",
        ),
        (
            "train_demo_teacher.py",
            ["--out", "{tmp}/out", "--work", "{tmp}", "--set", "vae_steps=600"],
            "train_demo_teacher.py: {tmp} holds stages of another recipe (vae_steps differ); "
            "give another --work or delete it",
        ),
    ],
)
def test_recipe_scripts_end_a_user_mistake_with_one_line_and_exit_1(tmp_path, script, arguments, message):
    (tmp_path / "recipe.json").write_text(json.dumps(asdict(TeacherRecipe())))
    command = [sys.executable, str(SCRIPTS / script), *(a.format(tmp=tmp_path) for a in arguments)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr, done.stdout) == (1, message.format(tmp=tmp_path) + "\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json"]


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ("adherence_from_noised_scenes.py", "img2img from noised scenes needs a whole pipeline"),
        ("count_histogram.py", "sampling needs a whole pipeline"),
        ("evaluate_demo_teacher.py", "evaluation needs a whole pipeline"),
        ("guidance_interval.py", "sampling needs a whole pipeline"),
        ("layout_at_t999.py", "the layout probe needs a whole pipeline"),
        ("position_reliance_ceiling.py", "the position-reliance probe needs a whole pipeline"),
        ("probe_placement_finetune.py", "the fine-tuning probe needs a whole pipeline"),
        ("vae_reconstruction.py", "reconstruction needs a whole pipeline"),
    ],
)
def test_recipe_scripts_that_need_a_whole_pipeline_refuse_a_bare_denoiser_in_one_line(tmp_path, script, why):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    command = [sys.executable, str(SCRIPTS / script), "--pipeline", str(tmp_path / "unet")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"{script}: {tmp_path / 'unet'} is a bare denoiser; {why}\n"
