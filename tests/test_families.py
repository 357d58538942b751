"""A new denoiser family is one registry entry: surgery, conversion, loading, conditioning and profiling
pick it up without changes to their code."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from tiny_models import tiny_pixart
from typer.testing import CliRunner

from deltaconv_cli import architectures
from deltaconv_cli.architectures import PIXART, denoiser_inputs, family_for, register_family
from deltaconv_cli.cli import app
from deltaconv_cli.conditioning import predict
from deltaconv_cli.errors import DeltaConvError
from deltaconv_cli.loading import load_converted
from deltaconv_cli.surgery import DeltaConvAdapter, find_self_attention_sites, mounted_adapter

runner = CliRunner()


class StandInDiT(PixArtTransformer2DModel):
    """A PixArt-like DiT under another class name, as a new family would bring."""


STAND_IN = dataclasses.replace(
    PIXART,
    name="stand-in-dit",
    denoiser_class=StandInDiT,
    label="a stand-in DiT",
    kernel_sizes={"all": 5},
    grid_sources=(StandInDiT,),
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(architectures, "FAMILIES", dict(architectures.FAMILIES))
    return register_family(STAND_IN)


def stand_in() -> StandInDiT:
    torch.manual_seed(0)
    return StandInDiT.from_config(tiny_pixart().config)


def test_an_unregistered_class_is_refused_with_the_supported_ones():
    with pytest.raises(DeltaConvError, match="unsupported model class StandInDiT; supported: UNet2D"):
        family_for(stand_in())


def test_a_registered_family_is_converted_mounted_and_called_like_the_built_in_ones(registered):
    model = stand_in().eval()
    assert family_for(model) is STAND_IN
    sites = find_self_attention_sites(model)
    assert len(sites) == len(model.transformer_blocks) and {s.grid_source for s in sites} == {""}
    inputs = denoiser_inputs(model, 2, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = predict(model, inputs["hidden_states"], inputs["timestep"], {
            k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")})  # fmt: skip
        adapter = DeltaConvAdapter.construct_for(model, seed=0).mount(model)
        assert adapter.config.family == "stand-in-dit" and set(adapter.config.kernel_sizes) == {5}
        student = model(**inputs).sample[:, :4]
        with adapter.bypassed():
            teacher = model(**inputs).sample[:, :4]
    assert original.shape == (2, 4, 8, 12)
    torch.testing.assert_close(teacher, original, rtol=0, atol=0)
    assert not torch.allclose(student, original)


def test_a_registered_family_goes_through_convert_load_and_profile(registered, tmp_path):
    stand_in().save_pretrained(tmp_path / "dit")
    args = ["convert", str(tmp_path / "dit"), "-o", str(tmp_path / "out"), "--json", "-"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["family"] == "stand-in-dit" and {layer["kernel_size"] for layer in report["layers"]} == {5}
    model = load_converted(tmp_path / "out")
    assert isinstance(model, StandInDiT) and mounted_adapter(model) is not None
    result = runner.invoke(app, ["profile", str(tmp_path / "dit"), "--res", "64", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["family"] == "stand-in-dit"
