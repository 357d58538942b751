"""Where new blocks start: from the attention they replace (the default), fitted to the teacher, or from
the ΔConv authors' random initialisation."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_denoiser
from typer.testing import CliRunner

from deltaconv_cli.architectures import denoiser_inputs
from deltaconv_cli.block import DeltaConvBlock
from deltaconv_cli.calibration import calibrate
from deltaconv_cli.cli import app
from deltaconv_cli.loading import load_model, locate_model
from deltaconv_cli.surgery import DeltaConvAdapter, find_self_attention_sites, resolve_kernel_sizes

LAYOUTS = ["sd1", "sd2", "sdxl", "pixart"]
runner = CliRunner()


def make_uniform(model) -> None:
    """Zero every self-attention's query and key: each softmax row becomes exactly uniform."""
    with torch.no_grad():
        for site in find_self_attention_sites(model):
            attention = model.get_submodule(site.name)
            for linear in (attention.to_q, attention.to_k):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()


def outputs(model, adapter, seed=0):
    kwargs = denoiser_inputs(model, 2, 8, 12, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        student = model(**kwargs).sample
        with adapter.bypassed():
            teacher = model(**kwargs).sample
    return student, teacher


def relative_error(student, teacher) -> float:
    return float((student - teacher).norm() / teacher.norm())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_start_reproduces_uniform_attention(layout):
    model = tiny_denoiser(layout).eval()
    make_uniform(model)
    with torch.no_grad():  # biases make the uniform limit's constant term visible
        for site in find_self_attention_sites(model):
            attention = model.get_submodule(site.name)
            if attention.to_v.bias is not None:
                attention.to_v.bias.normal_()
            attention.to_out[0].bias.normal_()
    adapter = DeltaConvAdapter.construct_for(model, seed=0).mount(model)
    student, teacher = outputs(model, adapter)
    torch.testing.assert_close(student, teacher, rtol=1e-4, atol=1e-5)
    adapter.unmount()
    random = DeltaConvAdapter.construct_for(model, init="random", seed=0).mount(model)
    assert relative_error(*outputs(model, random)) > 1e-2


@pytest.mark.parametrize("layout", ["sd1", "pixart"])
def test_random_start_is_the_authors_initialisation(layout):
    model = tiny_denoiser(layout)
    adapter = DeltaConvAdapter.construct_for(model, init="random", seed=3)
    sites = find_self_attention_sites(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        expected = [
            DeltaConvBlock(s.channels, k) for s, k in zip(sites, resolve_kernel_sizes(model), strict=True)
        ]
    for block, reference in zip(adapter.blocks, expected, strict=True):
        for name, value in reference.state_dict().items():
            assert torch.equal(block.state_dict()[name], value), name


def test_starts_are_deterministic_for_a_seed():
    model = tiny_denoiser("sd1")
    for init in ("teacher", "random"):
        a = DeltaConvAdapter.construct_for(model, init=init, seed=1).state_dict()
        b = DeltaConvAdapter.construct_for(model, init=init, seed=1).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_init_is_one_clear_line(saved_pipelines, tmp_path):
    result = runner.invoke(app, ["convert", str(saved_pipelines["sd1"]), "-o", str(tmp_path / "o"),
                                 "--init", "zeros"])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: init must be one of teacher, random, got 'zeros'"
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("calibration-images")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for i, caption in enumerate(["a red circle", "a blue square", "a green cat", "the cat"]):
        pixels = torch.randint(0, 255, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_fitting_reproduces_a_uniform_teacher(saved_pipelines, image_data):
    pipe = load_model(locate_model(saved_pipelines["sd1"]))
    make_uniform(pipe.unet)
    adapter = DeltaConvAdapter.construct_for(pipe, init="random", seed=0).mount(pipe)
    report = calibrate(pipe, adapter, str(image_data), 32, samples=2, timesteps=2)
    assert max(report.error_before.values()) > 0.1 and max(report.error_after.values()) < 1e-6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fitting_the_start_brings_it_closer_to_the_teacher(layout, saved_pipelines, image_data):
    pipe = load_model(locate_model(saved_pipelines[layout]))
    adapter = DeltaConvAdapter.construct_for(pipe, seed=0)
    start = {k: v.clone() for k, v in adapter.state_dict().items()}
    adapter.mount(pipe)
    report = calibrate(pipe, adapter, str(image_data), 32, samples=4, timesteps=3)
    assert (report.samples, len(report.timesteps)) == (4, 3) and report.tokens > 0
    assert set(report.error_after) == set(adapter.config.targets)
    for site, error in report.error_after.items():  # least squares: never worse than where it started
        assert error <= report.error_before[site] + 1e-9
    assert sum(report.error_after.values()) < sum(report.error_before.values())
    fitted = {k: v.clone() for k, v in adapter.state_dict().items()}
    adapter.load_state_dict(start)
    calibrate(pipe, adapter, str(image_data), 32, samples=4, timesteps=3)
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in fitted.items())


def test_convert_starts_from_the_teacher_reading_only_attention_weights(saved_pipelines, tmp_path):
    for init in ("teacher", "random"):
        result = runner.invoke(app, ["convert", str(saved_pipelines["sd1"]), "-o", str(tmp_path / init),
                                     "--init", init, "--json", "-"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["init"] == init
    pipe = load_model(locate_model(saved_pipelines["sd1"]))
    expected = DeltaConvAdapter.construct_for(pipe, seed=0).state_dict()
    written = DeltaConvAdapter.from_pretrained(tmp_path / "teacher" / "deltaconv").state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(written[key], value, rtol=1e-6, atol=1e-7)
    random = DeltaConvAdapter.from_pretrained(tmp_path / "random" / "deltaconv").state_dict()
    assert (
        random["blocks.0.proj_out.weight"].abs().sum() > 0 == written["blocks.0.proj_out.weight"].abs().sum()
    )
