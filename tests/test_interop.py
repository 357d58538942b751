"""Released weights: ConvFusion files and LinFusion folders, built here in exactly their published
layouts with random values, imported and checked against reference computations written from the same
layout description (not from our blocks); and our adapters exported to those layouts and read back."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import tiny_denoiser
from typer.testing import CliRunner

from deltaconv_cli.cli import app
from deltaconv_cli.interop import export_adapter, read_weights
from deltaconv_cli.loading import load_model, locate_model
from deltaconv_cli.surgery import DeltaConvAdapter, find_self_attention_sites

runner = CliRunner()
GATES = {"sd1": "scaled", "sdxl": "scaled", "pixart": "sigmoid"}  # the authors' students, per family


# ----------------------------------------------------------------------------------------------- ConvFusion


def convfusion_tensors(denoiser, *, scales=2, depthwise_bias=False, kernel=3, seed=0) -> dict:
    """A ConvFusion file's tensors for every self-attention of ``denoiser``: flat keys, ``conv1`` where
    ``attn1`` was, C' = C/2, kernels [k, k, C']."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) / math.sqrt(shape[-1])

    tensors = {}
    for site in find_self_attention_sites(denoiser):
        c, inner = site.channels, site.channels // 2
        prefix = site.name.removesuffix(".attn1") + ".conv1"
        tensors[f"{prefix}.conv_up.weight"], tensors[f"{prefix}.conv_up.bias"] = rand(inner, c), rand(inner)
        for i in range(scales):
            tensors[f"{prefix}.gates.{i}.conv_spatial.weight"] = rand(kernel, kernel, inner)
            if depthwise_bias:
                tensors[f"{prefix}.gates.{i}.conv_spatial.bias"] = rand(inner)
        tensors[f"{prefix}.conv_out.weight"] = rand(c, scales * inner // 2)
        tensors[f"{prefix}.conv_out.bias"] = rand(c)
        tensors[f"{prefix}.conv_pool.weight"], tensors[f"{prefix}.conv_pool.bias"] = rand(c, c), rand(c)
    return tensors


def convfusion_reference(tensors: dict, prefix: str, x: torch.Tensor, gate: str) -> torch.Tensor:
    """The block as the layout describes it, on a (B, H, W, C) grid."""
    _, height, width, _ = x.shape
    u = F.linear(x, tensors[f"{prefix}.conv_up.weight"], tensors[f"{prefix}.conv_up.bias"]).permute(
        0, 3, 1, 2
    )
    inner = u.shape[1]
    branches = []
    i = 0
    while f"{prefix}.gates.{i}.conv_spatial.weight" in tensors:
        kernel = tensors[f"{prefix}.gates.{i}.conv_spatial.weight"]
        scale = 2.0**-i
        pooled = u if i == 0 else F.adaptive_avg_pool2d(u, (int(height * scale), int(width * scale)))
        weight = kernel.permute(2, 0, 1).unsqueeze(1)
        bias = tensors.get(f"{prefix}.gates.{i}.conv_spatial.bias")
        v = F.conv2d(pooled, weight, bias, padding=kernel.shape[0] // 2, groups=inner)
        a, g = v.chunk(2, dim=1)
        z = a * g * math.sqrt(inner / 2) if gate == "scaled" else a * torch.sigmoid(g)
        if i > 0:
            z = F.interpolate(z, size=(height, width), mode="bilinear", align_corners=False)
        branches.append(z)
        i += 1
    local = F.linear(torch.cat(branches, 1).permute(0, 2, 3, 1), tensors[f"{prefix}.conv_out.weight"],
                     tensors[f"{prefix}.conv_out.bias"])  # fmt: skip
    pooled = F.linear(x.mean(dim=(1, 2), keepdim=True), tensors[f"{prefix}.conv_pool.weight"],
                      tensors[f"{prefix}.conv_pool.bias"])  # fmt: skip
    return local + pooled


@pytest.mark.parametrize("layout", ["sd1", "sdxl", "pixart"])
@pytest.mark.parametrize("scales,depthwise_bias", [(2, False), (2, True), (3, False), (3, True)])
def test_convfusion_blocks_reproduce_the_reference(layout, scales, depthwise_bias, tmp_path):
    denoiser = tiny_denoiser(layout)
    tensors = convfusion_tensors(denoiser, scales=scales, depthwise_bias=depthwise_bias, kernel=5)
    save_file(tensors, tmp_path / "student.safetensors")
    imported = read_weights(tmp_path / "student.safetensors", denoiser)
    adapter = imported.adapter
    assert imported.format == "convfusion" and imported.replaced == {} and imported.kept_attention == []
    assert adapter.config.gate == GATES[layout] and list(adapter.config.scales) == [1.0, 0.5, 0.25][:scales]
    assert adapter.config.targets == [s.name for s in find_self_attention_sites(denoiser)]
    generator = torch.Generator().manual_seed(1)
    for target, block in zip(adapter.config.targets, adapter.blocks, strict=True):
        x = torch.randn(2, 9, 7, block.channels, generator=generator)  # odd sizes: floor pooling
        expected = convfusion_reference(tensors, target.removesuffix(".attn1") + ".conv1", x, GATES[layout])
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_convfusion_import_into_a_model_folder_replaces_the_other_tensors(saved_pipelines, tmp_path):
    folder = saved_pipelines["sd1"]
    base = load_model(locate_model(folder))
    tensors = convfusion_tensors(base.unet)
    other = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"
    tensors[other] = torch.randn_like(base.unet.get_submodule(other.rsplit(".", 1)[0]).weight)
    resnet = "down_blocks.0.resnets.0.conv1.weight"  # a "conv1" that is not a ConvFusion block
    tensors[resnet] = torch.randn_like(base.unet.get_submodule(resnet.rsplit(".", 1)[0]).weight)
    save_file(tensors, tmp_path / "student.safetensors")
    args = [
        "convert",
        str(folder),
        "--weights",
        str(tmp_path / "student.safetensors"),
        "-o",
        str(tmp_path / "out"),
    ]
    result = runner.invoke(app, [*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["init"] == "imported" and report["imported"]["replaced_tensors"] == [other, resnet]
    converted = load_model(locate_model(tmp_path / "out"))
    for key in (other, resnet):
        torch.testing.assert_close(converted.unet.get_submodule(key.rsplit(".", 1)[0]).weight, tensors[key])
    adapter = DeltaConvAdapter.from_pretrained(tmp_path / "out" / "deltaconv")
    first = adapter.config.targets[0].removesuffix(".attn1") + ".conv1"
    torch.testing.assert_close(adapter.blocks[0].proj_in.weight, tensors[f"{first}.conv_up.weight"])
    sampled = runner.invoke(app, ["sample", str(tmp_path / "out"), "-p", "a red circle", "--steps", "1",
                                  "--out", str(tmp_path / "s")])  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    # Used directly as --adapter, a file that also replaces denoiser tensors points to convert --weights.
    direct = runner.invoke(app, ["sample", str(folder), "--adapter", str(tmp_path / "student.safetensors"),
                                 "-p", "a red circle", "--out", str(tmp_path / "d")])  # fmt: skip
    assert direct.exit_code == 1 and "convert MODEL --weights" in direct.stderr


def test_a_convfusion_file_without_other_tensors_is_an_adapter(saved_pipelines, tmp_path):
    base = load_model(locate_model(saved_pipelines["sd1"]))
    save_file(convfusion_tensors(base.unet), tmp_path / "student.safetensors")
    args = ["sample", str(saved_pipelines["sd1"]), "--adapter", str(tmp_path / "student.safetensors")]
    result = runner.invoke(
        app, [*args, "-p", "a red circle", "--steps", "1", "--out", str(tmp_path / "s"), "--json", "-"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["system"] == "deltaconv"


def bad(tensors: dict, key: str, value=None) -> dict:
    changed = dict(tensors)
    if value is None:
        del changed[key]
    else:
        changed[key] = value
    return changed


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda t, p: bad(t, f"{p}.conv_up.weight", torch.zeros(8, 8)),
            "channel counts do not match the base model",
        ),
        (
            lambda t, p: bad(t, f"{p}.gates.0.conv_spatial.weight", torch.zeros(16, 1, 3, 3)),
            "not a k x k x C' kernel",
        ),
        (
            lambda t, p: bad(t, f"{p}.gates.1.conv_spatial.weight", torch.zeros(4, 4, 16)),
            "not a k x k x C' kernel",
        ),
        (lambda t, p: bad(t, f"{p}.conv_pool.weight"), "conv_pool.weight is missing"),
        (
            lambda t, p: bad(t, "up_blocks.9.resnets.0.conv1.weigh", torch.zeros(1)),
            "names no parameter of the student",
        ),
        (
            lambda t, p: bad(t, f"{p.removesuffix('.conv1')}.attn1.to_q.weight", torch.zeros(32, 32)),
            "names no parameter of the student",
        ),
        (lambda t, p: bad(t, "conv_in.weight", torch.zeros(3)), "channel counts do not match the base model"),
        (
            lambda t, p: {k.replace("down_blocks.0.attentions.0.", ""): v for k, v in t.items()},
            "made for another model family",
        ),
    ],  # fmt: skip
)
def test_bad_convfusion_files_are_one_clear_line(change, message, saved_pipelines, tmp_path):
    denoiser = tiny_denoiser("sd1")
    first = find_self_attention_sites(denoiser)[0].name.removesuffix(".attn1") + ".conv1"
    save_file(change(convfusion_tensors(denoiser), first), tmp_path / "bad.safetensors")
    args = ["convert", str(saved_pipelines["sd1"]), "--weights", str(tmp_path / "bad.safetensors")]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_pickles_and_other_files_are_refused(saved_pipelines, tmp_path):
    (tmp_path / "student.ckpt").write_bytes(b"\x80\x04not really")
    (tmp_path / "notes.txt").write_text("hello")
    for name, message in (("student.ckpt", "is a pickle file"), ("notes.txt", "not a safetensors file"),
                          ("missing.safetensors", "not found")):  # fmt: skip
        args = [
            "convert",
            str(saved_pipelines["sd1"]),
            "--weights",
            str(tmp_path / name),
            "-o",
            str(tmp_path / "o"),
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.stderr, result.output
    hub = ["convert", str(saved_pipelines["sd1"]), "--weights", "someone/no-such-linfusion"]
    offline = runner.invoke(app, [*hub, "-o", str(tmp_path / "o")])
    assert offline.exit_code == 1 and "cannot fetch 'someone/no-such-linfusion'" in offline.stderr
    assert len(offline.stderr.strip().splitlines()) == 1
    clash = runner.invoke(app, ["convert", str(saved_pipelines["sd1"]), "--weights", str(tmp_path / "x"),
                                "-k", "5", "-o", str(tmp_path / "o")])  # fmt: skip
    assert clash.exit_code == 1 and "kernel sizes cannot be given with them" in clash.stderr


# ----------------------------------------------------------------------------------------------- LinFusion


def linfusion_folder(denoiser, folder, seed=0):
    """A LinFusion ModelMixin folder for every self-attention of ``denoiser``."""
    generator = torch.Generator().manual_seed(seed)
    modules, tensors = [], {}
    for i, site in enumerate(find_self_attention_sites(denoiser)):
        c = site.channels
        modules.append(
            {"module_name": site.name, "dim_n": c, "heads": site.heads, "projection_mid_dim": None}
        )
        for name in ("to_q", "to_k", "to_v"):
            tensors[f"{i}.{name}.weight"] = torch.randn(c, c, generator=generator) / math.sqrt(c)
        tensors[f"{i}.to_out.0.weight"] = torch.randn(c, c, generator=generator) / math.sqrt(c)
        tensors[f"{i}.to_out.0.bias"] = torch.randn(c, generator=generator)
        for mlp in ("to_q_", "to_k_"):
            for j in (0, 3):
                tensors[f"{i}.{mlp}.{j}.weight"] = torch.randn(c, c, generator=generator) / math.sqrt(c)
                tensors[f"{i}.{mlp}.{j}.bias"] = torch.randn(c, generator=generator) * 0.1
            tensors[f"{i}.{mlp}.1.weight"] = 1 + 0.1 * torch.randn(c, generator=generator)
            tensors[f"{i}.{mlp}.1.bias"] = 0.1 * torch.randn(c, generator=generator)
    folder.mkdir(parents=True)
    config = {"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": modules}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    return tensors, modules


def linfusion_reference(tensors: dict, i: int, heads: int, tokens: torch.Tensor) -> torch.Tensor:
    """LinFusion's generalized linear attention as its layout describes it, on (B, N, C) tokens."""

    def mlp(name, x):
        x = F.linear(x, tensors[f"{i}.{name}.0.weight"], tensors[f"{i}.{name}.0.bias"])
        x = F.layer_norm(x, x.shape[-1:], tensors[f"{i}.{name}.1.weight"], tensors[f"{i}.{name}.1.bias"])
        return F.linear(F.leaky_relu(x), tensors[f"{i}.{name}.3.weight"], tensors[f"{i}.{name}.3.bias"])

    batch, n, c = tokens.shape

    def split(x):
        return x.reshape(batch, n, heads, c // heads).transpose(1, 2)

    q = F.elu(split(F.linear(tokens + mlp("to_q_", tokens), tensors[f"{i}.to_q.weight"]))) + 1
    k = F.elu(split(F.linear(tokens + mlp("to_k_", tokens), tensors[f"{i}.to_k.weight"]))) + 1
    v = split(F.linear(tokens, tensors[f"{i}.to_v.weight"]))
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    kv = (k.transpose(-2, -1) * n**-0.5) @ (v * n**-0.5)
    out = (q @ kv / z).transpose(1, 2).reshape(batch, n, c)
    return F.linear(out, tensors[f"{i}.to_out.0.weight"], tensors[f"{i}.to_out.0.bias"])


@pytest.mark.parametrize("layout", ["sd1", "sd2", "sdxl"])
def test_linfusion_folders_reproduce_the_reference(layout, tmp_path):
    denoiser = tiny_denoiser(layout)
    tensors, modules = linfusion_folder(denoiser, tmp_path / "linfusion")
    imported = read_weights(tmp_path / "linfusion", denoiser)
    assert imported.format == "linfusion" and imported.adapter.config.mixer == "linfusion"
    generator = torch.Generator().manual_seed(2)
    for i, (module, block) in enumerate(zip(modules, imported.adapter.blocks, strict=True)):
        x = torch.randn(2, 5, 6, module["dim_n"], generator=generator)
        expected = linfusion_reference(tensors, i, module["heads"], x.reshape(2, 30, -1)).reshape(x.shape)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_an_official_linfusion_folder_serves_sample_and_eval_as_it_is(saved_pipelines, tmp_path):
    folder = saved_pipelines["sd1"]
    linfusion_folder(load_model(locate_model(folder)).unet, tmp_path / "linfusion")
    common = ["--steps", "1", "--json", "-"]
    sampled = runner.invoke(app, ["sample", str(folder), "--adapter", str(tmp_path / "linfusion"),
                                  "-p", "a cat", *common, "--out", str(tmp_path / "s")])  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    assert json.loads(sampled.stdout)["system"] == "linfusion"
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    evaluated = runner.invoke(app, ["eval", str(folder), "--linfusion-adapter", str(tmp_path / "linfusion"),
                                    "--prompts", str(tmp_path / "p.txt"), "--timing-rounds", "1", *common,
                                    "--out", str(tmp_path / "e")])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    systems = {s["name"]: s for s in json.loads(evaluated.stdout)["systems"]}
    assert set(systems) == {"original", "linfusion"} and systems["linfusion"]["psnr_db"] < 100


def test_bad_linfusion_folders_are_one_clear_line(saved_pipelines, tmp_path):
    from deltaconv_cli.errors import DeltaConvError

    denoiser = tiny_denoiser("sd1")
    linfusion_folder(tiny_denoiser("pixart"), tmp_path / "pixart")
    args = [
        "convert",
        str(saved_pipelines["sd1"]),
        "--weights",
        str(tmp_path / "pixart"),
        "-o",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "is not a self-attention of this UNet2DConditionModel" in result.stderr
    linfusion_folder(denoiser, tmp_path / "lf")
    config = json.loads((tmp_path / "lf" / "config.json").read_text())
    first = config["modules_list"][0]
    first["dim_n"] += 16
    (tmp_path / "lf" / "config.json").write_text(json.dumps(config))
    channels = first["dim_n"] - 16
    expected = f"has dim_n {first['dim_n']} and {first['heads']} heads, the base model {channels} channels"
    with pytest.raises(DeltaConvError, match=expected):
        read_weights(tmp_path / "lf", denoiser)
    config["modules_list"][0]["dim_n"] -= 16
    config["modules_list"][0]["projection_mid_dim"] = -1
    (tmp_path / "lf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaConvError, match="projection_mid_dim -1 is not supported"):
        read_weights(tmp_path / "lf", denoiser)
    (tmp_path / "lf" / "diffusion_pytorch_model.safetensors").rename(
        tmp_path / "lf" / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(DeltaConvError, match="pickle file, which is not read"):
        read_weights(tmp_path / "lf", denoiser)


# ----------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "layout,scales", [("sd1", (1.0, 0.5)), ("sdxl", (1.0, 0.5, 0.25)), ("pixart", (1.0, 0.5))]
)
def test_export_then_import_is_the_identity_for_convfusion(layout, scales, tmp_path):
    denoiser = tiny_denoiser(layout)
    adapter = DeltaConvAdapter.construct_for(
        denoiser, scales=scales, gate=GATES[layout], seed=3, init="random"
    )
    with torch.no_grad():
        for block in adapter.blocks:
            for conv in block.convs:
                conv.bias.normal_()  # trained here, the depthwise biases are not zero
    adapter.save_pretrained(tmp_path / "adapter")
    report = export_adapter(tmp_path / "adapter", "convfusion", tmp_path / "student.safetensors")
    assert any("conv_spatial.bias" in note for note in report.notes)
    keys = load_file(tmp_path / "student.safetensors")
    first = adapter.config.targets[0].removesuffix(".attn1") + ".conv1"
    k = adapter.config.kernel_sizes[0]
    assert keys[f"{first}.gates.0.conv_spatial.weight"].shape == (k, k, adapter.blocks[0].inner_channels)
    back = read_weights(tmp_path / "student.safetensors", denoiser).adapter
    assert tuple(back.config.scales) == scales and back.config.kernel_sizes == adapter.config.kernel_sizes
    for key, value in adapter.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_export_then_import_is_the_identity_for_linfusion(saved_pipelines, tmp_path):
    converted = tmp_path / "converted"
    denoiser = tiny_denoiser("sd1")
    adapter = DeltaConvAdapter.construct_for(denoiser, mixer="linfusion", seed=4)
    adapter.save_pretrained(converted / "deltaconv")
    result = runner.invoke(
        app, ["export", str(converted), "--format", "linfusion", "-o", str(tmp_path / "lf")]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "lf" / "config.json").read_text())
    assert config["_class_name"] == "LinFusion"
    site = find_self_attention_sites(denoiser)[0]
    expected = {"module_name": site.name, "dim_n": site.channels, "heads": site.heads}
    assert config["modules_list"][0] == {**expected, "projection_mid_dim": None}
    assert "0.to_q_.3.bias" in load_file(tmp_path / "lf" / "diffusion_pytorch_model.safetensors")
    back = read_weights(tmp_path / "lf", denoiser).adapter
    for key, value in adapter.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_export_refuses_what_the_other_layout_cannot_hold(tmp_path):
    denoiser = tiny_denoiser("sd1")
    DeltaConvAdapter.construct_for(denoiser, scales=(1.0, 0.4), init="random").save_pretrained(
        tmp_path / "odd"
    )
    DeltaConvAdapter.construct_for(denoiser, init="random").save_pretrained(tmp_path / "plain")
    cases = [
        (["odd", "--format", "convfusion", "-o", "x.safetensors"], "do not record scales"),
        (["plain", "--format", "linfusion", "-o", "lf"], "holds deltaconv blocks; linfusion takes linfusion"),
        (["plain", "--format", "convfusion", "-o", "x.bin"], "ending in .safetensors"),
        (["plain", "--format", "onnx", "-o", "x"], "format must be one of convfusion, linfusion"),
    ]
    for args, message in cases:
        result = runner.invoke(
            app, ["export", str(tmp_path / args[0]), *args[1:3], "-o", str(tmp_path / args[4])]
        )
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert not (tmp_path / args[4]).exists()
