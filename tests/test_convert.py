"""`deltaconv convert` through the CLI on saved tiny pipelines of each layout, and its clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from tiny_models import LAYOUTS, pipeline_call_kwargs, tiny_denoiser
from typer.testing import CliRunner

from deltaconv_cli import convert as convert_lib
from deltaconv_cli.architectures import denoiser_inputs, denoiser_of
from deltaconv_cli.cli import app
from deltaconv_cli.errors import DeltaConvError
from deltaconv_cli.loading import load_converted
from deltaconv_cli.surgery import ReplacedSelfAttention, find_self_attention_sites, mounted_adapter

runner = CliRunner()
SIZES = [(32, 32), (32, 48)]  # pixels: square and non-square (latent 16x16 and 16x24)


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, text):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("layout", LAYOUTS)
def test_convert_pipeline_end_to_end(layout, saved_pipelines, tmp_path):
    out = tmp_path / "converted"
    report_file = tmp_path / "report.json"
    result = cli("convert", saved_pipelines[layout], "-o", out, "--json", report_file)
    assert result.exit_code == 0, result.output
    assert "self-attention layers" in result.stdout and "parameters:" in result.stdout

    report = json.loads(report_file.read_text())
    original = DiffusionPipeline.from_pretrained(saved_pipelines[layout])
    sites = find_self_attention_sites(original)
    assert [layer["name"] for layer in report["layers"]] == [s.name for s in sites]
    assert report["params_before"] == sum(p.numel() for p in denoiser_of(original).parameters())
    assert (
        report["params_after"] == report["params_before"] - report["params_removed"] + report["params_added"]
    )
    assert sorted(p.name for p in (out / "deltaconv").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]

    # Plain diffusers still reads OUT as the original model (the teacher).
    plain = DiffusionPipeline.from_pretrained(out)
    kwargs = denoiser_inputs(denoiser_of(original), 2, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(denoiser_of(plain)(**kwargs).sample, denoiser_of(original)(**kwargs).sample)

    pipe = load_converted(out)
    denoiser = denoiser_of(pipe)
    assert sum(isinstance(m, ReplacedSelfAttention) for m in denoiser.modules()) == len(sites)
    for height, width in SIZES:
        kwargs = denoiser_inputs(
            denoiser, 2, height // 2, width // 2, generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            sample = denoiser(**kwargs).sample
        assert sample.shape[-2:] == (height // 2, width // 2) and torch.isfinite(sample).all()
        images = pipe(
            "a red circle",
            num_inference_steps=2,
            height=height,
            width=width,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **pipeline_call_kwargs(layout),
        ).images
        assert images.shape == (1, height, width, 3) and (images >= 0).all() and (images <= 1).all()


def test_convert_bare_denoiser_folder_with_kernel_options(tmp_path):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    sizes_file = tmp_path / "sizes.json"
    sizes_file.write_text(json.dumps({"kernel_sizes": {"down_blocks.0": 3}}))
    out = tmp_path / "out"
    result = cli(
        "convert",
        tmp_path / "unet",
        "-o",
        out,
        "-k",
        "mid_block=5",
        "--kernel-sizes",
        sizes_file,
        "--gate",
        "sigmoid",
        "--json",
        "-",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_stage = {layer["stage"]: layer["kernel_size"] for layer in report["layers"]}
    assert by_stage == {
        "down_blocks.0": 3,
        "down_blocks.1": 9,
        "mid_block": 5,
        "up_blocks.1": 9,
        "up_blocks.2": 11,
    }
    assert {layer["name"]: layer["grid_stride"] for layer in report["layers"]}[
        "mid_block.attentions.0.transformer_blocks.0.attn1"
    ] == 4
    unet = load_converted(out)
    assert isinstance(unet, UNet2DConditionModel)
    adapter = mounted_adapter(unet)
    assert adapter.config.gate == "sigmoid"
    with torch.no_grad():
        assert unet(**denoiser_inputs(unet, 1, 10, 14)).sample.shape == (1, 4, 10, 14)


def test_overwrite(saved_pipelines, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_one_line_error(cli("convert", saved_pipelines["sd1"], "-o", out), "is not empty; pass --overwrite")
    assert (out / "keep.txt").exists()
    result = cli("convert", saved_pipelines["sd1"], "-o", out, "--overwrite", "--seed", "5")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "deltaconv" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_leaves_no_half_written_output(saved_pipelines, tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_lib.DeltaConvAdapter, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_lib.convert(saved_pipelines["sd1"], tmp_path / "out", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_path(tmp_path):
    assert_one_line_error(cli("convert", tmp_path / "nope", "-o", tmp_path / "out"), "no such folder")


def test_unreachable_hub_id(tmp_path):
    result = cli("convert", "someone/some-model", "-o", tmp_path / "out")
    assert_one_line_error(result, "cannot fetch 'someone/some-model' from the Hugging Face hub")
    assert "local diffusers folder" in result.stderr


def test_unsupported_model_class(tmp_path):
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8).save_pretrained(tmp_path / "vae")
    result = cli("convert", tmp_path / "vae", "-o", tmp_path / "out")
    assert_one_line_error(result, "unsupported model class AutoencoderKL; supported: UNet2DConditionModel")


def test_pickle_only_weights_are_refused(tmp_path):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet", safe_serialization=False)
    result = cli("convert", tmp_path / "unet", "-o", tmp_path / "out")
    assert_one_line_error(result, "has only pickle weights (diffusion_pytorch_model.bin)")


@pytest.mark.parametrize(
    ("seed", "message"),
    [(-1, "seed must be >= 0, got -1"), (2**64, f"seeds must be below 2**64, got {2**64}")],
)
def test_a_seed_torch_cannot_take_is_refused_before_anything_is_written(seed, message, tmp_path):
    result = cli("convert", "demo", "-o", tmp_path / "out", "--seed", seed)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_even_kernel_size_is_refused(saved_pipelines, tmp_path):
    result = cli("convert", saved_pipelines["sd1"], "-o", tmp_path / "out", "-k", "4")
    assert_one_line_error(result, "kernel sizes must be positive odd numbers, got 4")


def test_corrupt_adapter(saved_pipelines, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", saved_pipelines["sd1"], "-o", out).exit_code == 0
    weights = out / "deltaconv" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DeltaConvError, match="adapter in .* is corrupt or incomplete"):
        load_converted(out)


def test_not_converted_folder(saved_pipelines):
    with pytest.raises(DeltaConvError, match="has no ΔConv adapter"):
        load_converted(saved_pipelines["sd1"])


def test_each_load_converted_call_returns_its_own_model(tmp_path):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    assert cli("convert", tmp_path / "unet", "-o", tmp_path / "out").exit_code == 0
    first, second = load_converted(tmp_path / "out"), load_converted(tmp_path / "out")
    assert first is not second
    mounted_adapter(first).unmount()
    assert mounted_adapter(first) is None and mounted_adapter(second) is not None


def test_enabled_switches_the_blocks_back_on_inside_bypassed(tmp_path):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    assert cli("convert", tmp_path / "unet", "-o", tmp_path / "out").exit_code == 0
    unet = load_converted(tmp_path / "out")
    adapter = mounted_adapter(unet)
    inputs = denoiser_inputs(unet, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student = unet(**inputs).sample
        with adapter.bypassed():
            teacher = unet(**inputs).sample
            with adapter.enabled():
                again = unet(**inputs).sample
            assert torch.equal(unet(**inputs).sample, teacher)
    assert torch.equal(again, student) and not torch.equal(student, teacher)
