"""`deltaconv sample` and `deltaconv eval` on tiny converted pipelines, and the metrics they rely on."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tiny_models import tiny_denoiser
from typer.testing import CliRunner

from deltaconv_cli.cli import app
from deltaconv_cli.demo.quality import held_out_captions, real_images
from deltaconv_cli.evaluation import INCEPTION_FILE, fid, folder_features
from deltaconv_cli.imaging import psnr, ssim, to_uint8

runner = CliRunner()


def sample(*args):
    result = runner.invoke(app, ["sample", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_is_deterministic_and_batching_moves_a_pixel_by_one_grey_level_at_most(converted, tmp_path):
    common = [converted, "-p", "a red circle", "-p", "a blue square", "-n", "2", "--steps", "2"]
    sample(*common, "--out", tmp_path / "a", "--batch-size", "4")
    sample(*common, "--out", tmp_path / "again", "--batch-size", "4")
    sample(*common, "--out", tmp_path / "b", "--batch-size", "1")
    names = sorted(p.name for p in (tmp_path / "a").glob("p*.png"))
    assert names == ["p00000-s0.png", "p00000-s1.png", "p00001-s0.png", "p00001-s1.png"]
    for name in names:
        # Identical settings: identical pixels. Another batch size: CPU kernels may sum in another
        # order (they differ between Intel and AMD), so README promises one grey level, no more.
        assert np.array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "again" / name))
        across = np.abs(pixels(tmp_path / "a" / name).astype(int) - pixels(tmp_path / "b" / name).astype(int))
        assert across.max() <= 1
    assert not np.array_equal(pixels(tmp_path / "a" / names[0]), pixels(tmp_path / "a" / names[1]))
    info = Image.open(tmp_path / "a" / names[1]).text
    assert (info["prompt"], info["seed"], info["steps"], info["system"]) == (
        "a red circle",
        "1",
        "2",
        "deltaconv",
    )
    assert (tmp_path / "a" / "grid.png").is_file() and (tmp_path / "a" / "samples.json").is_file()


def test_compare_renders_the_original_with_the_same_seeds(converted, saved_pipelines, tmp_path):
    sample(converted, "-p", "a green cat", "--seed", "7", "--steps", "2", "--height", "32", "--width", "48",
           "--compare", "--scheduler", "ddim", "--out", tmp_path)  # fmt: skip
    plain = DiffusionPipeline.from_pretrained(saved_pipelines["sd1"])
    plain.scheduler = type(plain.scheduler).from_config(plain.scheduler.config)
    plain.vae.enable_tiling()  # 48 px is wider than this VAE's native 32 px: sample decodes tiled
    generator = [torch.Generator().manual_seed(7)]
    call = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": 32, "width": 48, "output_type": "np"}
    expected = plain("a green cat", generator=generator, **call).images[0]
    original = pixels(tmp_path / "original" / "p00000-s7.png")
    assert original.shape == (32, 48, 3)
    assert np.abs(original.astype(int) - to_uint8(expected).astype(int)).max() <= 1
    assert not np.array_equal(original, pixels(tmp_path / "p00000-s7.png"))


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_schedulers_by_name(converted, tmp_path, scheduler):
    result = sample(
        converted, "-p", "a cat", "--steps", "2", "--scheduler", scheduler, "--out", tmp_path, "--json", "-"
    )
    assert json.loads(result.stdout)["scheduler"].lower().startswith(scheduler[:4].replace("+", ""))


def test_sample_errors(converted, tmp_path):
    result = runner.invoke(
        app, ["sample", str(converted), "-p", "x", "--height", "30", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "resolution 30x" in result.stderr and "is not a multiple of 8 pixels" in result.stderr
    assert "valid sizes are 8, 16, 24, ..." in result.stderr
    result = runner.invoke(
        app, ["sample", str(converted), "-p", "x", "--scheduler", "magic", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1 and "unknown scheduler 'magic'; choose one of ddim" in result.stderr
    result = runner.invoke(app, ["sample", str(converted), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "give --prompt TEXT" in result.stderr
    result = runner.invoke(app, ["sample", str(converted), "--prompts", "nope.txt", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "prompt file nope.txt not found (or use demo:N" in result.stderr


@pytest.mark.parametrize(
    ("command", "needs"),
    [
        (["sample", "-p", "x"], "sampling"),
        (["distill", "--data", "demo", "--steps", "1"], "distill"),
        (["analyze", "-p", "x"], "analysis"),
    ],
)
def test_a_bare_denoiser_folder_is_refused_in_one_line_before_any_output(command, needs, tmp_path):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    name, *options = command
    result = runner.invoke(app, [name, str(tmp_path / "unet"), *options, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    # distill may first note that this CPU trains in fp32; the error is the last line
    assert (
        result.stderr.splitlines()[-1]
        == f"error: {tmp_path / 'unet'} is a bare denoiser; {needs} needs a whole pipeline"
    )
    assert not (tmp_path / "out").exists()


def test_held_out_demo_captions_as_prompts(converted, tmp_path):
    result = sample(converted, "--prompts", "demo:3", "--steps", "1", "--out", tmp_path, "--json", "-")
    assert [image["prompt"] for image in json.loads(result.stdout)["images"]] == held_out_captions(3)[0]


@pytest.mark.slow
def test_two_processes_split_the_prompts(converted, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "\n".join(["a red circle", "a blue square", "a green cat", "the cat", "a photo"]) + "\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m",
               "deltaconv_cli", "sample", str(converted), "--prompts", str(prompts), "--steps", "1",
               "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.name for p in (tmp_path / "out").glob("p*.png"))
    assert files == [f"p{i:05d}-s0.png" for i in range(5)]
    prompts_seen = [Image.open(tmp_path / "out" / f).text["prompt"] for f in files]
    assert prompts_seen == prompts.read_text().split("\n")[:5]


def _write(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def test_fid_with_the_domain_extractor(tmp_path):
    images = real_images(11, 120)
    rng = np.random.default_rng(0)

    def noisy(sigma):
        return [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8) for im in images]

    device = torch.device("cpu")
    clean = folder_features(_write(tmp_path / "clean", images), "domain", device)
    same = folder_features(_write(tmp_path / "same", images), "domain", device)
    light = folder_features(_write(tmp_path / "light", noisy(8)), "domain", device)
    heavy = folder_features(_write(tmp_path / "heavy", noisy(40)), "domain", device)
    assert fid(clean, same) == pytest.approx(0.0, abs=1e-6)
    assert 0 < fid(clean, light) < fid(clean, heavy)


def test_agreement_metrics_are_exact_on_identical_images():
    images = real_images(12, 10)
    assert psnr(images, images) == float("inf")
    assert ssim(images, images) == pytest.approx(1.0, abs=1e-9)
    other = real_images(13, 10)
    assert psnr(images, other) < 30 and ssim(images, other) < 1


@pytest.mark.skipif(INCEPTION_FILE.exists(), reason="Inception weights are present on this machine")
def test_missing_inception_weights_is_one_clear_line(converted, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = runner.invoke(app, ["eval", str(converted), "--prompts", str(prompts), "--reference", "original",
                                 "--steps", "1", "--out", str(tmp_path / "e")])  # fmt: skip
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "clean-fid's Inception weights are not on this machine" in lines[0]


def test_eval_end_to_end_and_reuse(converted, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green cat\nthe cat\n")
    args = [
        "eval",
        str(converted),
        "--prompts",
        str(prompts),
        "--reference",
        "original",
        "--feature",
        "domain",
    ]
    args += ["--steps", "2", "--trajectory-prompts", "2", "--out", str(tmp_path / "e"), "--json", "-"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    systems = {s["name"]: s for s in report["systems"]}
    assert set(systems) == {"original", "deltaconv"}
    assert systems["original"]["fid"] == pytest.approx(0.0, abs=1e-3)  # sqrtm rounding
    assert systems["deltaconv"]["psnr_db"] < 100 and 0 < systems["deltaconv"]["denoiser_relative_error"]
    assert systems["deltaconv"]["seconds_per_image"] > 0 and systems["deltaconv"]["peak_memory_bytes"] > 0
    assert not any(s["reused"] for s in report["systems"])
    assert report["skipped"] == {"clip_score": "no --clip folder given (a local CLIP model)"}
    assert report["warnings"][0].startswith("domain features describe the demo's scenes only")
    assert report["warnings"][1].startswith("FID from 4 images per system is dominated by bias and noise")
    assert "warning: FID from 4 images per system" in first.stderr
    second = runner.invoke(app, args[:-2])
    assert second.exit_code == 0, second.output
    assert (
        "reused the 4 images of original" in second.stdout
        and "reused the 4 images of deltaconv" in second.stdout
    )
    assert (tmp_path / "e" / "grid.png").is_file()
    (tmp_path / "e" / "images" / "deltaconv" / "settings.json").write_text('{"steps": 2')  # cut short
    third = runner.invoke(app, args[:-2])
    assert third.exit_code == 0, third.output
    assert "reused the 4 images of original" in third.stdout
    assert "reused the 4 images of deltaconv" not in third.stdout


def test_a_model_without_adapter_samples_as_the_original(tmp_path):
    result = runner.invoke(app, ["sample", "demo", "-p", "two red circles", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "p00000-s0.png")
    assert image.size == (64, 64)
    assert (image.text["system"], image.text["adapter"], image.text["prompt"]) == (
        "original",
        "None",
        "two red circles",
    )
    assert "1 image (original," in result.stdout
    # the demo teacher's recommended sampler: guidance 2 after the first 20 % of the steps
    assert (image.text["guidance"], image.text["guidance_start"]) == ("2.0", "0.2")


@pytest.mark.parametrize(
    ("model", "settings", "expected"),
    [
        ("demo", {}, (2.0, 0.2)),
        ("demo", {"guidance": 3.0}, (3.0, 0.2)),
        ("demo", {"guidance": 1.0}, (1.0, 0.0)),  # nothing to start where nothing is guided
        ("demo", {"guidance_start": 0.0}, (2.0, 0.0)),
        ("sd1", {}, (7.5, 0.0)),
        ("sd1", {"guidance_start": 0.3}, (7.5, 0.3)),
    ],
)
def test_unset_guidance_and_start_are_the_models_recommended(model, settings, expected, saved_pipelines):
    from deltaconv_cli.sampling import SampleSettings

    resolved = SampleSettings(**settings).for_model("demo" if model == "demo" else saved_pipelines[model])
    assert (resolved.guidance, resolved.guidance_start) == expected


def test_compare_metadata_names_the_adapter_only_on_the_student(converted, tmp_path):
    sample(converted, "-p", "a cat", "--steps", "1", "--compare", "--out", tmp_path)
    assert Image.open(tmp_path / "p00000-s0.png").text["adapter"] == str(converted / "deltaconv")
    assert Image.open(tmp_path / "original" / "p00000-s0.png").text["adapter"] == "None"


DEMO_N = "prompts demo:N takes a positive number of captions, got"
TOO_LARGE_SEED = f"seeds must be below 2**64, got {2**64}"


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("sample", ["-p", "x", "--height", "0"], "height must be a positive number of pixels, got 0"),
        ("sample", ["-p", "x", "--width", "-8"], "width must be a positive number of pixels, got -8"),
        ("sample", ["-p", "x", "--batch-size", "0"], "batch size must be at least 1, got 0"),
        ("sample", ["-p", "x", "--steps", "0"], "steps must be at least 1, got 0"),
        ("sample", ["-p", "x", "--guidance", "nan"], "guidance must be a finite number >= 0, got nan"),
        ("sample", ["-p", "x", "--guidance-rescale", "1.5"], "guidance rescale must be in [0, 1], got 1.5"),
        ("sample", ["--prompts", "demo:0"], f"{DEMO_N} 'demo:0'"),
        ("eval", ["--prompts", "demo:0"], f"{DEMO_N} 'demo:0'"),
        ("eval", ["--prompts", "demo:x"], f"{DEMO_N} 'demo:x'"),
        ("eval", ["--prompts", "demo:2", "--batch-size", "0"], "batch size must be at least 1, got 0"),
        ("eval", ["--prompts", "demo:2", "--height", "0"], "height must be a positive number of pixels"),
        ("eval", ["--prompts", "demo:2", "--feature", "dino"], "FID features must be inception or domain"),
        (
            "eval",
            ["--prompts", "demo:2", "--guidance-rescale", "-0.1"],
            "guidance rescale must be in [0, 1], got -0.1",
        ),
        ("sample", ["-p", "x", "--guidance-start", "1.5"], "guidance start must be in [0, 1], got 1.5"),
        (
            "eval",
            ["--prompts", "demo:2", "--guidance", "1", "--guidance-start", "0.2"],
            "a guidance start needs guidance above 1, got 1.0",
        ),
        ("sample", ["-p", "x", "--seed", "-1"], "seed must be >= 0, got -1"),
        ("sample", ["-p", "x", "-n", "2", "--seed", str(2**64 - 1)], TOO_LARGE_SEED),
        ("eval", ["--prompts", "demo:2", "--seed", "-1"], "seed must be >= 0, got -1"),
        ("eval", ["--prompts", "demo:2", "--seed", str(2**64 - 1)], TOO_LARGE_SEED),
    ],
)
def test_bad_settings_fail_before_any_model_is_loaded(command, args, message, tmp_path, refuse_model_loading):
    out = tmp_path / "out"
    result = runner.invoke(app, [command, "demo", *args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert not out.exists()


def test_guidance_rescale_reaches_the_pipeline_and_its_metadata(saved_pipelines, tmp_path):
    sample(
        saved_pipelines["sd1"], "-p", "a cat", "--steps", "2", "--guidance-rescale", "0.7", "--out", tmp_path
    )
    written = np.asarray(Image.open(tmp_path / "p00000-s0.png"))
    assert Image.open(tmp_path / "p00000-s0.png").text["guidance_rescale"] == "0.7"
    pipe = DiffusionPipeline.from_pretrained(saved_pipelines["sd1"]).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 2, "guidance_scale": 7.5, "output_type": "np"}
    images = {
        rescale: to_uint8(
            pipe(
                ["a cat"], generator=[torch.Generator("cpu").manual_seed(0)], guidance_rescale=rescale, **call
            ).images[0]
        )
        for rescale in (0.0, 0.7)
    }
    assert np.array_equal(written, images[0.7])  # the same computation as diffusers' own call
    assert not np.array_equal(images[0.0], images[0.7])  # and the rescale changes the image


def test_eval_samples_every_system_with_the_guidance_rescale(saved_pipelines, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = ["eval", str(saved_pipelines["sd1"]), "--prompts", str(prompts), "--steps", "2"]
    args += ["--trajectory-prompts", "0", "--timing-rounds", "0", "--out", str(tmp_path / "e")]
    first = runner.invoke(app, [*args, "--guidance-rescale", "0.7", "--json", "-"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["settings"]["guidance_rescale"] == 0.7
    written = np.asarray(Image.open(tmp_path / "e" / "images" / "original" / "00000.png"))
    pipe = DiffusionPipeline.from_pretrained(saved_pipelines["sd1"]).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 2, "guidance_scale": 7.5, "output_type": "np", "guidance_rescale": 0.7}
    expected = pipe(["a cat"], generator=[torch.Generator("cpu").manual_seed(0)], **call).images[0]
    assert np.array_equal(written, to_uint8(expected))
    second = runner.invoke(app, args)  # without the rescale: new images, not the cached ones
    assert second.exit_code == 0, second.output
    assert "reused" not in second.stdout


@pytest.mark.parametrize(("scheduler", "loop_steps"), [("ddim", 4), ("heun", 7)])
def test_guidance_start_leaves_the_first_share_of_the_steps_unguided(saved_pipelines, scheduler, loop_steps):
    from deltaconv_cli.sampling import UNGUIDED, SampleSettings, pipeline_images, set_scheduler

    pipe = DiffusionPipeline.from_pretrained(saved_pipelines["sd1"]).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    seen = []  # the guidance scale at each denoiser call; Heun's loop makes two calls a step but the last
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(pipe.guidance_scale))
    size = (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    for _ in range(2):  # the second call starts unguided again
        pipeline_images(pipe, ["a cat"], [0], size, SampleSettings(4, 7.5, guidance_start=0.5))
    first_guided = loop_steps // 2
    assert seen == ([UNGUIDED] * first_guided + [7.5] * (loop_steps - first_guided)) * 2


def test_guidance_start_reaches_the_pipeline_and_its_metadata(saved_pipelines, tmp_path):
    model = saved_pipelines["sd1"]
    sample(model, "-p", "a cat", "--steps", "4", "--scheduler", "ddim", "--out", tmp_path / "all")
    sample(
        model,
        "-p",
        "a cat",
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--guidance-start",
        "0.5",
        "--out",
        tmp_path,
    )
    image = Image.open(tmp_path / "p00000-s0.png")
    assert image.text["guidance_start"] == "0.5"
    assert not np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "all" / "p00000-s0.png")))


GUIDANCE_OPTIONS = ("--guidance-rescale", "--guidance-start")


@pytest.mark.parametrize(
    ("command", "option"),
    [
        *((command, option) for command in ("sample", "eval") for option in GUIDANCE_OPTIONS),
        ("analyze", "--guidance-start"),
    ],
)
def test_guidance_options_on_a_pipeline_without_them_fail_before_loading(
    command, option, saved_pipelines, tmp_path, refuse_model_loading
):
    out = tmp_path / "out"
    prompt = ["--prompts", "demo:2"] if command == "eval" else ["-p", "x"]
    args = [command, str(saved_pipelines["pixart"]), *prompt, option, "0.5", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    why = {
        "--guidance-rescale": "have no guidance rescale; leave it at 0",
        "--guidance-start": "fix guidance for the whole call; leave the guidance start at 0",
    }[option]
    assert result.stderr == f"error: PixArt-α/Σ DiT pipelines {why}\n"
    assert not out.exists()


def test_grid_gives_the_images_the_whole_width(tmp_path):
    from deltaconv_cli.imaging import save_grid

    images = real_images(14, 3)
    save_grid([images], tmp_path / "g.png", ["a", "b", "c"], ["a long caption " * 20], scale=2)
    grid = Image.open(tmp_path / "g.png")
    assert grid.width == 3 * (64 * 2 + 2)
    first = np.asarray(grid.convert("RGB"))[grid.height - 2 - 128 : grid.height - 2, :128]
    np.testing.assert_array_equal(first[::2, ::2], images[0])


@pytest.mark.skipif(INCEPTION_FILE.exists(), reason="Inception weights are present on this machine")
def test_missing_inception_weights_fail_before_any_model_is_loaded(converted, tmp_path, refuse_model_loading):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    result = runner.invoke(app, ["eval", str(converted), "--prompts", str(prompts), "--reference", "original",
                                 "--out", str(tmp_path / "e")])  # fmt: skip
    assert result.exit_code == 1
    assert "Inception weights are not on this machine" in result.stderr
    assert "--feature domain" not in result.stderr  # the demo's extractor means nothing for this model
    assert not (tmp_path / "e").exists()


def test_fid_without_reference_is_skipped_with_the_reason(converted, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = ["eval", str(converted), "--prompts", str(prompts), "--steps", "1", "--trajectory-prompts", "0"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "e"), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "skipped fid: no --reference given" in result.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["skipped"]["fid"].startswith("no --reference given")
    assert all(system["fid"] is None for system in report["systems"])


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "demo", "-p", "x"],
        ["eval", "demo", "--prompts", "demo:2"],
        ["analyze", "demo"],
        ["distill", "demo", "--data", "demo", "--recipe", "demo"],
        ["convert", "demo"],
    ],
)
def test_an_output_path_that_is_a_file_fails_before_any_model_is_loaded(
    command, tmp_path, refuse_model_loading
):
    out = tmp_path / "taken"
    out.write_text("a file of the user's")
    result = runner.invoke(app, [*command, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == f"error: {out} exists and is not a folder"
    assert out.read_text() == "a file of the user's"


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_prompt_file_that_is_not_text_fails_before_any_model_is_loaded(
    command, tmp_path, refuse_model_loading
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe")
    out = tmp_path / "out"
    result = runner.invoke(app, [command, "demo", "--prompts", str(prompts), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == f"error: {prompts} is not UTF-8 text (byte 13: invalid start byte)"
    assert not out.exists()


@pytest.mark.parametrize("command", [["sample", "demo", "-p", "x"], ["analyze", "demo"]])
def test_an_output_path_through_a_file_fails_before_any_model_is_loaded(
    command, tmp_path, refuse_model_loading
):
    taken = tmp_path / "taken"
    taken.write_text("a file of the user's")
    result = runner.invoke(app, [*command, "--out", str(taken / "out")])
    assert result.exit_code == 1, result.output
    assert (
        result.stderr.strip() == f"error: {taken / 'out'} cannot be written: {taken} is a file, not a folder"
    )


def test_a_full_disk_is_one_line(converted, tmp_path, monkeypatch):
    import deltaconv_cli.sampling

    def no_space(image, path, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(deltaconv_cli.sampling, "save_png", no_space)
    result = runner.invoke(app, ["sample", str(converted), "-p", "x", "--steps", "1", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]  # after the progress lines
    assert last == f"error: No space left on device: {tmp_path / 'p00000-s0.png'}"


def test_a_reference_folder_without_images_fails_before_any_model_is_loaded(tmp_path, refuse_model_loading):
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "notes.txt").write_text("not an image")
    out = tmp_path / "e"
    args = ["eval", "demo", "--prompts", "demo:2", "--reference", str(reference), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert (
        result.stderr.strip() == f"error: reference folder {reference} holds 0 images; FID needs at least 2"
    )
    assert not out.exists()


def test_an_adapter_for_another_model_fails_before_any_image_is_generated(
    converted, saved_pipelines, tmp_path
):
    from deltaconv_cli.loading import load_model, locate_model
    from deltaconv_cli.surgery import DeltaConvAdapter

    other = tmp_path / "sdxl-adapter"
    DeltaConvAdapter.construct_for(load_model(locate_model(saved_pipelines["sdxl"]))).save_pretrained(other)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "e"
    args = ["eval", str(converted), "--prompts", prompts, "--adapter", other, "--steps", "1", "--out", out]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: adapter ")
    assert not out.exists()
