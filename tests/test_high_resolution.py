"""High resolution end to end: tiled VAE decoding chosen by image size, systems timed in turns by
``eval`` and ``profile --end-to-end``, and where a converted model starts to pay off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_denoiser
from typer.testing import CliRunner

from deltaconv_cli.cli import app
from deltaconv_cli.conditioning import latent_posterior, use_tiled_vae
from deltaconv_cli.demo.quality import real_images, to_tensor
from deltaconv_cli.imaging import psnr, to_uint8
from deltaconv_cli.loading import load_model, locate_model
from deltaconv_cli.profile import SizeTiming, SystemTiming, crossover_side
from deltaconv_cli.runtime import Timer

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_tiled_vae_is_chosen_above_the_native_size_and_agrees_with_untiled_decoding():
    pipe = load_model(locate_model("demo"))  # a trained VAE whose native size is only 64 px
    assert pipe.vae.config.sample_size == 64
    assert use_tiled_vae(pipe, (64, 64)) is False and not pipe.vae.use_tiling
    assert use_tiled_vae(pipe, (64, 128)) is True and pipe.vae.use_tiling
    scenes = real_images(5, 4)  # four 64 px scenes as one 128 px image: 2 x 2 tiles of the native size
    image = np.concatenate([np.concatenate(scenes[:2], 1), np.concatenate(scenes[2:], 1)], 0)
    with torch.no_grad():
        use_tiled_vae(pipe, (64, 64))
        latents = pipe.vae.encode(to_tensor(image[None])).latent_dist.mode()
        whole = pipe.vae.decode(latents).sample
        use_tiled_vae(pipe, (128, 128))
        tiled = pipe.vae.decode(latents).sample
    whole, tiled = (to_uint8((x[0].permute(1, 2, 0).numpy() + 1) / 2) for x in (whole, tiled))
    # Tiles are normalised on their own and blended over a quarter of their width: small differences
    # near the seams (32.5 dB measured on this image), nothing like a different image.
    assert psnr([whole], [tiled]) > 30.0


def test_encoding_for_distillation_is_tiled_above_the_native_size():
    pipe = load_model(locate_model("demo"))
    with torch.no_grad():
        small = latent_posterior(pipe, to_tensor(np.stack(real_images(5, 1))))
        assert not pipe.vae.use_tiling and small.mode().shape == (1, 4, 32, 32)
        large = latent_posterior(pipe, torch.zeros(1, 3, 128, 192))
    assert pipe.vae.use_tiling and large.mode().shape == (1, 4, 64, 96)


def test_sample_above_the_native_size_decodes_tiled_and_reports_peak_memory(converted, tmp_path):
    common = [converted, "-p", "a red circle", "--steps", "1", "--json", "-"]
    native = json.loads(invoke("sample", *common, "--out", tmp_path / "a").stdout)
    large = json.loads(
        invoke("sample", *common, "--height", "64", "--width", "96", "--out", tmp_path / "b").stdout
    )
    assert (native["height"], native["vae_tiling"]) == (32, False)
    assert (large["height"], large["width"], large["vae_tiling"]) == (64, 96, True)
    assert large["peak_memory_bytes"] > 0 and large["peak_memory_kind"] == "process peak RSS"
    with Image.open(tmp_path / "b" / "p00000-s0.png") as image:
        assert image.size == (96, 64)


def test_eval_times_every_system_in_one_interleaved_measurement(converted, tmp_path, monkeypatch):
    calls = []

    def interleaved(self, run, setups):
        calls.append(list(setups))
        return {name: 1000.0 * (i + 1) for i, name in enumerate(setups)}

    monkeypatch.setattr(Timer, "interleaved_latency_ms", interleaved)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = ["eval", converted, "--prompts", prompts, "--steps", "1", "--trajectory-prompts", "0"]
    report = json.loads(invoke(*args, "--out", tmp_path / "e", "--json", "-").stdout)
    assert calls == [["original", "deltaconv"]]
    seconds = {s["name"]: s["seconds_per_image"] for s in report["systems"]}
    assert seconds == {"original": 1.0, "deltaconv": 2.0}
    assert "systems in turns" in report["timing"] and report["vae_tiling"] is False
    none = json.loads(invoke(*args, "--timing-rounds", "0", "--out", tmp_path / "e", "--json", "-").stdout)
    assert calls == [["original", "deltaconv"]]  # not timed again
    assert none["skipped"]["timing"] == "timing rounds set to 0"
    assert {s["seconds_per_image"] for s in none["systems"]} == {None}


@pytest.mark.slow
def test_end_to_end_sweep_times_three_systems_per_size(converted, tmp_path):
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["--end-to-end", "--res", "32", "64", "--steps", "1", "--repeats", "1"]
    result = invoke("profile", converted, *args, "--json", out, "--plot", plot)
    report = json.loads(out.read_text())
    assert [(s["height"], s["vae_tiling"]) for s in report["sizes"]] == [(32, False), (64, True)]
    for size in report["sizes"]:
        timings = size["systems"]
        assert set(timings) == {"original", "deltaconv", "linfusion"}
        assert all(t["seconds_per_image"] > 0 and t["peak_bytes"] > 0 and t["skipped"] is None
                   for t in timings.values())  # fmt: skip
        for name in ("deltaconv", "linfusion"):
            expected = timings["original"]["seconds_per_image"] / timings[name]["seconds_per_image"]
            assert size["speedup_over_original"][name] == pytest.approx(expected)
        # The counted work: attention's share of the step is replaced, the rest is the same.
        assert timings["deltaconv"]["macs_per_image"] < timings["original"]["macs_per_image"]
    assert report["adapters"]["deltaconv"] == str(converted / "deltaconv")  # the folder's own blocks
    assert report["adapters"]["linfusion"].startswith("blocks with random weights")
    assert (report["steps"], report["repeats"]) == (1, 1)
    assert "s / image ΔConv" in result.stdout and "64x64 (tiled VAE)" in result.stdout
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 600


def test_end_to_end_skips_what_the_budget_cannot_hold_with_the_estimate(converted, tmp_path):
    args = ["profile", converted, "--end-to-end", "--res", "32", "--steps", "1", "--time-budget", "1e-6"]
    report = json.loads(invoke(*args, "--json", "-").stdout)
    timings = report["sizes"][0]["systems"]
    assert all(
        t["seconds_per_image"] is None and t["skipped"].startswith("estimated") for t in timings.values()
    )
    assert report["crossover"] == {"deltaconv": None, "linfusion": None}


def sizes(*seconds: tuple[float | None, float | None]) -> list[SizeTiming]:
    return [
        SizeTiming(
            side, side, False, {"original": SystemTiming(1, original), "deltaconv": SystemTiming(1, ours)}
        )
        for side, (original, ours) in zip((64, 128, 256, 512), seconds, strict=False)
    ]


@pytest.mark.parametrize(
    "seconds,side",
    [
        (((1.0, 1.2), (2.0, 1.5), (8.0, 3.0)), 128),  # slower at 64, faster from 128 on
        (((1.0, 0.9), (2.0, 2.1), (8.0, 3.0)), 256),  # faster at 64, but not at 128: counts from 256
        (((1.0, 0.9), (2.0, 1.5), (8.0, 9.0)), None),  # slower at the largest size measured
        (((1.0, 1.2), (2.0, 1.5), (None, 3.0)), 128),  # the original skipped at 256: not held against
        (((None, 1.0),), None),  # nothing to compare
    ],
)
def test_crossover_is_where_the_system_stays_faster(seconds, side):
    assert crossover_side(sizes(*seconds), "deltaconv") == side


@pytest.mark.parametrize(
    "args,message",
    [
        (["sd15", "--end-to-end"], "sd15 is a built-in configuration without weights"),
        (["demo", "--end-to-end", "--measure"], "give one"),
        (["demo", "--adapter", "x"], "--adapter applies to --end-to-end timing only"),
        (["demo", "--end-to-end", "--steps", "0"], "steps must be at least 1"),
        (["demo", "--end-to-end", "--repeats", "0"], "repeats must be at least 1"),
        (["demo", "--end-to-end", "--res", "65"], "not a multiple of"),
    ],
)
def test_end_to_end_bad_options_are_one_line(args, message, refuse_model_loading):
    result = runner.invoke(app, ["profile", *args])
    assert result.exit_code == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_end_to_end_needs_a_whole_pipeline(tmp_path):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    result = runner.invoke(app, ["profile", str(tmp_path / "unet"), "--end-to-end", "--res", "32"])
    assert result.exit_code == 1 and "end-to-end timing needs a whole pipeline" in result.stderr
