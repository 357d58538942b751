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


def convfusion_reference(
    tensors: dict, prefix: str, x: torch.Tensor, gate: str, scales: tuple = (1.0, 0.5)
) -> torch.Tensor:
    """The block as the layout describes it, on a (B, H, W, C) grid (branch i at ``scales[i]``)."""
    _, height, width, _ = x.shape
    u = F.linear(x, tensors[f"{prefix}.conv_up.weight"], tensors[f"{prefix}.conv_up.bias"]).permute(
        0, 3, 1, 2
    )
    inner = u.shape[1]
    branches = []
    i = 0
    while f"{prefix}.gates.{i}.conv_spatial.weight" in tensors:
        kernel = tensors[f"{prefix}.gates.{i}.conv_spatial.weight"]
        scale = scales[i]
        pooled = u if scale == 1 else F.adaptive_avg_pool2d(u, (int(height * scale), int(width * scale)))
        weight = kernel.permute(2, 0, 1).unsqueeze(1)
        bias = tensors.get(f"{prefix}.gates.{i}.conv_spatial.bias")
        v = F.conv2d(pooled, weight, bias, padding=kernel.shape[0] // 2, groups=inner)
        a, g = v.chunk(2, dim=1)
        z = a * g * math.sqrt(inner / 2) if gate == "scaled" else a * torch.sigmoid(g)
        if scale != 1:
            z = F.interpolate(z, size=(height, width), mode="bilinear", align_corners=False)
        branches.append(z)
        i += 1
    local = F.linear(torch.cat(branches, 1).permute(0, 2, 3, 1), tensors[f"{prefix}.conv_out.weight"],
                     tensors[f"{prefix}.conv_out.bias"])  # fmt: skip
    pooled = F.linear(x.mean(dim=(1, 2), keepdim=True), tensors[f"{prefix}.conv_pool.weight"],
                      tensors[f"{prefix}.conv_pool.bias"])  # fmt: skip
    return local + pooled


# The authors' block builds scales (1, 1/2); their README's example (1, 1/2, 1/3), given as --scales.
@pytest.mark.parametrize("layout", ["sd1", "sdxl", "pixart"])
@pytest.mark.parametrize(
    "scales,depthwise_bias",
    [((1.0, 0.5), False), ((1.0, 0.5), True), ((1.0, 1 / 2, 1 / 3), False), ((1.0, 1 / 2, 1 / 3), True)],
)
def test_convfusion_blocks_reproduce_the_reference(layout, scales, depthwise_bias, tmp_path):
    denoiser = tiny_denoiser(layout)
    tensors = convfusion_tensors(denoiser, scales=len(scales), depthwise_bias=depthwise_bias, kernel=5)
    save_file(tensors, tmp_path / "student.safetensors")
    given = scales if len(scales) > 2 else None
    imported = read_weights(tmp_path / "student.safetensors", denoiser, scales=given)
    adapter = imported.adapter
    assert imported.format == "convfusion" and imported.replaced == {} and imported.kept_attention == []
    assert adapter.config.gate == GATES[layout] and tuple(adapter.config.scales) == scales
    assert imported.scales_from == ("given" if given else "two gates: the authors' (1, 1/2)")
    assert adapter.config.targets == [s.name for s in find_self_attention_sites(denoiser)]
    generator = torch.Generator().manual_seed(1)
    for target, block in zip(adapter.config.targets, adapter.blocks, strict=True):
        x = torch.randn(2, 9, 7, block.channels, generator=generator)  # odd sizes: floor pooling
        prefix = target.removesuffix(".attn1") + ".conv1"
        expected = convfusion_reference(tensors, prefix, x, GATES[layout], scales)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_scales_a_file_does_not_record_are_asked_for(saved_pipelines, tmp_path):
    denoiser = tiny_denoiser("sd1")
    save_file(convfusion_tensors(denoiser, scales=3), tmp_path / "three.safetensors")
    save_file(convfusion_tensors(denoiser, scales=1), tmp_path / "one.safetensors")
    base = ["convert", str(saved_pipelines["sd1"]), "-o", str(tmp_path / "out")]
    cases = [
        (
            ["--weights", str(tmp_path / "three.safetensors")],
            "three.safetensors has 3 gates per block, and a ConvFusion file does not record their "
            "scales: give them to convert --weights, e.g. --scales 1,1/2,1/3",
        ),
        (["--weights", str(tmp_path / "one.safetensors")], "has 1 gate per block"),
        (
            ["--weights", str(tmp_path / "three.safetensors"), "--scales", "1,1/2"],
            "has 3 gates per block, but --scales gives 2 scales",
        ),
        (["--weights", str(tmp_path / "three.safetensors"), "--scales", "1,1/0,1/3"], "numbers or fractions"),
        (["--weights", str(tmp_path / "three.safetensors"), "--scales", "1,2,1/3"], "must be in (0, 1]"),
        (["--scales", "1,1/2"], "--scales reads released weights: give --weights too"),
        (["--ema"], "--ema reads released weights: give --weights too"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    given = runner.invoke(
        app,
        [*base, "--weights", str(tmp_path / "three.safetensors"), "--scales", "1, 1/2, 1/3", "--json", "-"],
    )
    assert given.exit_code == 0, given.output
    report = json.loads(given.stdout)["imported"]
    assert report["scales"] == [1.0, 0.5, 1 / 3] and report["scales_from"] == "given"
    assert DeltaConvAdapter.from_pretrained(tmp_path / "out" / "deltaconv").config.scales == [1.0, 0.5, 1 / 3]


# ----------------------------------------------------------------------------------------------- nesting


def nested_file(tensors: dict, path, groups=("base",), seed=0) -> dict:
    """A file as the authors' training engine saved it before 2025-05-12 (RainbowNekoEngine's
    SafeTensorFormat.unfold_dict of ``{"base": state, "base_ema": ema_state}``): each key of the state under
    ``<group>:``; the EMA copy holds other values. Returns each group's tensors, flat."""
    generator = torch.Generator().manual_seed(seed)
    copies = {
        group: {
            k: (v + 0.01 * i * torch.randn(v.shape, generator=generator)).to(v.dtype)
            for k, v in tensors.items()
        }
        for i, group in enumerate(groups)
    }
    save_file(
        {f"{group}:{key}": value for group, state in copies.items() for key, value in state.items()}, path
    )
    return copies


def test_keys_nested_under_base_are_the_model_and_base_ema_is_read_when_asked(saved_pipelines, tmp_path):
    base = load_model(locate_model(saved_pipelines["sd1"]))
    tensors = convfusion_tensors(base.unet)
    resnet = "down_blocks.0.resnets.0.conv1.weight"
    tensors[resnet] = torch.randn_like(base.unet.get_submodule(resnet.rsplit(".", 1)[0]).weight)
    copies = nested_file(tensors, tmp_path / "student.safetensors", ("base", "base_ema"))
    first = find_self_attention_sites(base.unet)[0].name.removesuffix(".attn1") + ".conv1"
    for ema, group in ((False, "base"), (True, "base_ema")):
        imported = read_weights(tmp_path / "student.safetensors", base, ema=ema)
        assert imported.key_nesting == group and set(imported.replaced) == {resnet}
        assert torch.equal(
            imported.adapter.blocks[0].proj_in.weight, copies[group][f"{first}.conv_up.weight"]
        )
        assert torch.equal(imported.replaced[resnet], copies[group][resnet])
    args = [
        "convert",
        str(saved_pipelines["sd1"]),
        "--weights",
        str(tmp_path / "student.safetensors"),
        "--ema",
        "-o",
        str(tmp_path / "out"),
    ]
    result = runner.invoke(app, [*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported"]["key_nesting"] == "base_ema"
    converted = load_model(locate_model(tmp_path / "out"))
    assert torch.equal(
        converted.unet.get_submodule(resnet.rsplit(".", 1)[0]).weight, copies["base_ema"][resnet]
    )
    shown = runner.invoke(app, args[:-2] + ["-o", str(tmp_path / "shown")])
    assert "the EMA copy (base_ema:)" in shown.stdout, shown.output


@pytest.mark.parametrize(
    "keys,ema,message",
    [
        (
            lambda k: f"base_ema:{k}",
            False,
            "holds only an EMA copy (base_ema: keys); read it with convert --weights odd.safetensors --ema",
        ),
        (lambda k: k, True, "has no EMA copy (no base_ema: keys; it has flat keys): leave out --ema"),
        (lambda k: f"base:{k}", True, "has no EMA copy (no base_ema: keys; it has keys under base: only)"),
        (lambda k: f"model:{k}", False, "has keys nested under 'model' (model:"),
        (lambda k: f"base:ema:{k}", False, "has a key nested two deep (base:ema:"),
        (lambda k: f"base:{k}" if "conv_up" in k else k, False, "mixes flat keys"),
    ],
)
def test_other_nesting_is_one_clear_line(keys, ema, message, saved_pipelines, tmp_path):
    tensors = convfusion_tensors(tiny_denoiser("sd1"))
    save_file({keys(key): value for key, value in tensors.items()}, tmp_path / "odd.safetensors")
    args = ["convert", str(saved_pipelines["sd1"]), "--weights", str(tmp_path / "odd.safetensors")]
    result = runner.invoke(app, [*args, *(["--ema"] if ema else []), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("ema", [False, True])
def test_nested_import_export_import_keeps_every_tensor_bit_for_bit(ema, tmp_path):
    denoiser = tiny_denoiser("sdxl")
    half = {key: value.half() for key, value in convfusion_tensors(denoiser, depthwise_bias=True).items()}
    copies = nested_file(half, tmp_path / "student.safetensors", ("base", "base_ema"))
    wanted = copies["base_ema" if ema else "base"]
    first = read_weights(tmp_path / "student.safetensors", denoiser, ema=ema).adapter
    first.save_pretrained(tmp_path / "adapter")
    export_adapter(tmp_path / "adapter", "convfusion", tmp_path / "flat.safetensors")
    exported = load_file(tmp_path / "flat.safetensors")
    assert not any(":" in key for key in exported)  # export writes flat keys, as the authors' loader reads
    assert set(exported) == set(wanted)
    for key, value in wanted.items():  # fp16 values survive fp32 exactly
        assert torch.equal(exported[key], value.float()), key
    again = read_weights(tmp_path / "flat.safetensors", denoiser).adapter
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


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


def linfusion_folder(denoiser, folder, seed=0, mid_dim_scale=None):
    """A LinFusion ModelMixin folder for every self-attention of ``denoiser``. As LinFusion's trainer writes
    it: ``projection_mid_dim`` None (MLP width dim_n), dim_n // mid_dim_scale (its --mid_dim_scale; 16 for
    LinFusion-XL) or -1 (no MLP: no to_q_/to_k_ tensors)."""
    generator = torch.Generator().manual_seed(seed)
    modules, tensors = [], {}
    for i, site in enumerate(find_self_attention_sites(denoiser)):
        c = site.channels
        width = None if mid_dim_scale is None else -1 if mid_dim_scale == -1 else c // mid_dim_scale
        modules.append(
            {"module_name": site.name, "dim_n": c, "heads": site.heads, "projection_mid_dim": width}
        )
        for name in ("to_q", "to_k", "to_v"):
            tensors[f"{i}.{name}.weight"] = torch.randn(c, c, generator=generator) / math.sqrt(c)
        tensors[f"{i}.to_out.0.weight"] = torch.randn(c, c, generator=generator) / math.sqrt(c)
        tensors[f"{i}.to_out.0.bias"] = torch.randn(c, generator=generator)
        m = c if width is None else width
        for mlp in ("to_q_", "to_k_") if width != -1 else ():
            tensors[f"{i}.{mlp}.0.weight"] = torch.randn(m, c, generator=generator) / math.sqrt(c)
            tensors[f"{i}.{mlp}.0.bias"] = torch.randn(m, generator=generator) * 0.1
            tensors[f"{i}.{mlp}.1.weight"] = 1 + 0.1 * torch.randn(m, generator=generator)
            tensors[f"{i}.{mlp}.1.bias"] = 0.1 * torch.randn(m, generator=generator)
            tensors[f"{i}.{mlp}.3.weight"] = torch.randn(c, m, generator=generator) / math.sqrt(m)
            tensors[f"{i}.{mlp}.3.bias"] = torch.randn(c, generator=generator) * 0.1
    folder.mkdir(parents=True)
    config = {"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": modules}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    return tensors, modules


def linfusion_reference(tensors: dict, i: int, heads: int, tokens: torch.Tensor) -> torch.Tensor:
    """LinFusion's generalized linear attention as its layout describes it, on (B, N, C) tokens."""

    def mlp(name, x):
        if f"{i}.{name}.0.weight" not in tensors:  # projection_mid_dim -1: LinFusion's identity
            return x
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


@pytest.mark.parametrize(
    "layout,mid_dim_scale",
    [("sd1", None), ("sd2", None), ("sdxl", None), ("sdxl", 16), ("sd1", 4), ("sd1", -1)],
)
def test_linfusion_folders_reproduce_the_reference(layout, mid_dim_scale, tmp_path):
    denoiser = tiny_denoiser(layout)
    tensors, modules = linfusion_folder(denoiser, tmp_path / "linfusion", mid_dim_scale=mid_dim_scale)
    imported = read_weights(tmp_path / "linfusion", denoiser)
    assert imported.format == "linfusion" and imported.adapter.config.mixer == "linfusion"
    widths = imported.adapter.config.projection_mid_dims
    assert widths == (None if mid_dim_scale is None else [m["projection_mid_dim"] for m in modules])
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
    for width, message in (
        (0, "projection_mid_dim 0 is not a width"),
        ("8", "projection_mid_dim '8' is not"),
        (-1, r"0\.to_[qk]_\.[013]\.\w+ has no place in module 0, whose projection_mid_dim is"),
        (4, r"0\.to_[qk]_\.[013]\.\w+ is \[16(, 16)?\], expected \[4(, 16)?\] from config"),
    ):
        config["modules_list"][0]["projection_mid_dim"] = width
        (tmp_path / "lf" / "config.json").write_text(json.dumps(config))
        with pytest.raises(DeltaConvError, match=message):
            read_weights(tmp_path / "lf", denoiser)
    config["modules_list"][0]["projection_mid_dim"] = None
    broken = json.loads(json.dumps(config))
    del broken["modules_list"][0]["heads"]
    (tmp_path / "lf" / "config.json").write_text(json.dumps(broken))
    with pytest.raises(DeltaConvError, match="a modules_list entry has heads None, not a whole number"):
        read_weights(tmp_path / "lf", denoiser)
    # An early LinFusion-2-1 config: class StableMamba, entries as [module_name, dim_n, heads].
    early = {
        "_class_name": "StableMamba",
        "modules_list": [[m["module_name"], m["dim_n"], m["heads"]] for m in config["modules_list"]],
    }
    (tmp_path / "lf" / "config.json").write_text(json.dumps(early))
    result = runner.invoke(app, [*args[:3], str(tmp_path / "lf"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "an early LinFusion config (class StableMamba" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "lf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "lf" / "diffusion_pytorch_model.safetensors").rename(
        tmp_path / "lf" / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(DeltaConvError, match="pickle file, which is not read"):
        read_weights(tmp_path / "lf", denoiser)


# ----------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "layout,scales",
    [("sd1", (1.0, 0.5)), ("sdxl", (1.0, 0.5, 0.25)), ("pixart", (1.0, 0.5)), ("sd1", (1.0, 0.4))],
)
def test_export_then_import_is_the_identity_for_convfusion(layout, scales, tmp_path):
    """Scales other than the authors' (1, 1/2) come back from the file's metadata, where export records them
    (the authors' loader ignores metadata)."""
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
    assert any("not the authors' (1, 1/2)" in note for note in report.notes) == (scales != (1.0, 0.5))
    imported = read_weights(tmp_path / "student.safetensors", denoiser)
    back = imported.adapter
    assert tuple(back.config.scales) == scales and back.config.kernel_sizes == adapter.config.kernel_sizes
    expected_from = (
        "two gates: the authors' (1, 1/2)"
        if len(scales) == 2 and scales == (1.0, 0.5)
        else "recorded in the file's metadata by deltaconv export"
    )
    assert imported.scales_from in (expected_from, "recorded in the file's metadata by deltaconv export")
    for key, value in adapter.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("mid_dim_scale", [16, -1])
def test_narrow_linfusion_widths_import_export_import_bit_for_bit(mid_dim_scale, tmp_path):
    denoiser = tiny_denoiser("sdxl")
    tensors, modules = linfusion_folder(denoiser, tmp_path / "xl", mid_dim_scale=mid_dim_scale)
    first = read_weights(tmp_path / "xl", denoiser).adapter
    first.save_pretrained(tmp_path / "adapter")
    export_adapter(tmp_path / "adapter", "linfusion", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert [m["projection_mid_dim"] for m in config["modules_list"]] == [
        m["projection_mid_dim"] for m in modules
    ]
    exported = load_file(tmp_path / "back" / "diffusion_pytorch_model.safetensors")
    assert set(exported) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(exported[key], value), key
    again = read_weights(tmp_path / "back", denoiser).adapter
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_new_linfusion_blocks_take_linfusion_xl_widths(tmp_path):
    from deltaconv_cli.distill import DistillConfig
    from deltaconv_cli.errors import DeltaConvError

    denoiser = tiny_denoiser("sdxl")
    sites = find_self_attention_sites(denoiser)
    narrow = DeltaConvAdapter.construct_for(denoiser, mixer="linfusion", mid_dim_scale=16, seed=0)
    assert narrow.config.projection_mid_dims == [s.channels // 16 for s in sites]
    assert narrow.blocks[0].mlp_q[0].weight.shape == (sites[0].channels // 16, sites[0].channels)
    bare = DeltaConvAdapter.construct_for(denoiser, mixer="linfusion", mid_dim_scale=-1)
    assert not any(".mlp_" in key for key in bare.state_dict())
    bare.save_pretrained(tmp_path / "bare")
    assert DeltaConvAdapter.from_pretrained(tmp_path / "bare").config.projection_mid_dims == [-1] * len(sites)
    for mixer, scale, message in (
        ("deltaconv", 16, "deltaconv blocks have none"),
        ("linfusion", 0, "mid_dim_scale must be a whole number >= 1, or -1"),
        ("linfusion", 64, "leaves no width for a site of 32 channels"),
    ):
        with pytest.raises(DeltaConvError, match=message):
            DeltaConvAdapter.construct_for(denoiser, mixer=mixer, mid_dim_scale=scale)
    with pytest.raises(DeltaConvError, match="mid_dim_scale sets LinFusion's feature MLPs; deltaconv has"):
        DistillConfig(mid_dim_scale=16).check()
    with pytest.raises(DeltaConvError, match="setting mid_dim_scale must be a whole number >= 1, or -1"):
        DistillConfig(mixer="linfusion", mid_dim_scale=0).check()
    DistillConfig(mixer="linfusion", mid_dim_scale=16).check()


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
    DeltaConvAdapter.construct_for(denoiser, init="random").save_pretrained(tmp_path / "plain")
    cases = [
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


# ----------------------------------------------------------------------------------------------- base models


def test_the_base_model_is_recorded_and_a_different_one_is_warned_about(saved_pipelines, tmp_path):
    folder = saved_pipelines["sd1"]
    fresh = runner.invoke(app, ["convert", str(folder), "-o", str(tmp_path / "fresh"), "--json", "-"])
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(fresh.stdout)["base_model"] == str(folder.resolve())
    assert DeltaConvAdapter.from_pretrained(
        tmp_path / "fresh" / "deltaconv"
    ).config.base_model_name_or_path == str(folder.resolve())
    save_file(convfusion_tensors(tiny_denoiser("sd1")), tmp_path / "student.safetensors")
    # A folder in the hub cache names its model: here another one than the authors' SD1.5 base.
    cached = tmp_path / "hub" / "models--someone--sd15-finetune" / "snapshots" / "0123abc"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(folder)
    args = ["convert", str(cached), "--weights", str(tmp_path / "student.safetensors")]
    other = runner.invoke(app, [*args, "-o", str(tmp_path / "other"), "--json", "-"])
    assert other.exit_code == 0, other.output
    report = json.loads(other.stdout)
    assert report["base_model"] == "Lykon/DreamShaper"
    assert report["warnings"] == [
        "these blocks were made for Lykon/DreamShaper, and MODEL is someone/sd15-finetune: on another model "
        "they do not compute what their authors measured"
    ]
    adapter = DeltaConvAdapter.from_pretrained(tmp_path / "other" / "deltaconv")
    assert adapter.config.base_model_name_or_path == "Lykon/DreamShaper"
    shown = runner.invoke(app, [*args, "-o", str(tmp_path / "shown")])
    assert "warning: these blocks were made for Lykon/DreamShaper" in shown.stdout
    assert "DreamShaper 7 upload, not DreamShaper 8" in shown.stdout
    # A local folder's model is not known: no warning, the report names the model the blocks belong on.
    local = runner.invoke(
        app,
        [
            "convert",
            str(folder),
            "--weights",
            str(tmp_path / "student.safetensors"),
            "-o",
            str(tmp_path / "local"),
            "--json",
            "-",
        ],
    )
    assert json.loads(local.stdout)["warnings"] == []
    assert json.loads(local.stdout)["imported"]["base_model_note"].startswith("made for Lykon/DreamShaper")


def test_pixart1024_students_have_no_single_base_model(tmp_path):
    denoiser = tiny_denoiser("pixart")
    for name, base in (
        ("ConvFusion-pixart512-laion.safetensors", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"),
        ("ConvFusion-pixart1024-laion.safetensors", None),
    ):
        save_file(convfusion_tensors(denoiser), tmp_path / name)
        imported = read_weights(tmp_path / name, denoiser)
        assert imported.base_model == base and imported.adapter.config.base_model_name_or_path == base
        if base is None:
            assert "the 512-MS transformer inside the 1024-MS pipeline" in imported.base_model_note


# ----------------------------------------------------------------------------------------------- inspect


def test_inspect_reads_the_header_alone_and_says_what_convert_does(saved_pipelines, tmp_path, monkeypatch):
    import safetensors

    base = load_model(locate_model(saved_pipelines["sd1"]))
    tensors = convfusion_tensors(base.unet, scales=3)
    for key, value in base.unet.state_dict().items():
        if ".resnets." in key or ".attn1." in key:
            tensors[key] = value.half()
    nested_file(tensors, tmp_path / "student-sd15.safetensors", ("base", "base_ema"))

    def no_data(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    opened = safetensors.safe_open

    class HeaderOnly:  # safe_open whose get_tensor fails: inspect must not need it
        def __init__(self, *args, **kwargs):
            self.file = opened(*args, **kwargs)

        def __enter__(self):
            handle = self.file.__enter__()
            return type(
                "Handle",
                (),
                {
                    "keys": handle.keys,
                    "metadata": handle.metadata,
                    "get_slice": handle.get_slice,
                    "get_tensor": no_data,
                },
            )()

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    monkeypatch.setattr("deltaconv_cli.interop.safe_open", HeaderOnly)
    result = runner.invoke(app, ["inspect", str(tmp_path / "student-sd15.safetensors"), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    sites = find_self_attention_sites(base.unet)
    assert report["format"] == "convfusion" and report["family"] == "sd"
    assert report["blocks"] == len(sites) and report["channels"] == sorted({s.channels for s in sites})
    assert report["kernel_sizes"] == [3] and report["gates"] == 3 and report["scales"] is None
    assert report["key_nesting"] == ["base", "base_ema"] and report["base_model"] == "Lykon/DreamShaper"
    assert report["dtypes"] == {
        "F32": 2 * sum(1 for v in tensors.values() if v.dtype == torch.float32),
        "F16": 2 * sum(1 for v in tensors.values() if v.dtype == torch.float16),
    }
    groups = {g["module"]: g for g in report["groups"]}
    resnets = [k for k in tensors if k.startswith("up_blocks.") and ".resnets." in k]
    assert groups["base:up_blocks.*.resnets"]["tensors"] == len(resnets)
    assert groups["base:up_blocks.*.resnets"]["bytes"] == sum(tensors[k].numel() * 2 for k in resnets)
    assert groups["base:up_blocks.*.resnets"]["action"].startswith("replace MODEL's tensors")
    attn1 = groups["base:down_blocks.*.attentions.*.transformer_blocks.*.attn1"]
    assert attn1["action"].startswith("refused by convert")
    assert groups["base_ema:*"]["tensors"] == len(tensors)
    assert any("--scales" in note for note in report["notes"])
    assert report["bytes"] == 2 * sum(v.numel() * v.element_size() for v in tensors.values())
    table = runner.invoke(app, ["inspect", str(tmp_path / "student-sd15.safetensors")])
    assert "base: and base_ema:" in table.stdout and "up_blocks.*.resnets" in table.stdout


def test_inspect_reads_linfusion_folders_adapters_and_converted_models(converted, tmp_path):
    denoiser = tiny_denoiser("sdxl")
    linfusion_folder(denoiser, tmp_path / "xl", mid_dim_scale=16)
    lf = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "xl"), "--json", "-"]).stdout)
    sites = find_self_attention_sites(denoiser)
    assert lf["format"] == "linfusion" and lf["family"] == "sdxl" and lf["blocks"] == len(sites)
    assert lf["projection_mid_dims"] == sorted({s.channels // 16 for s in sites})
    ours = json.loads(runner.invoke(app, ["inspect", str(converted), "--json", "-"]).stdout)
    assert ours["format"] == "deltaconv" and ours["mixer"] == "deltaconv" and ours["family"] == "sd"
    assert ours["base_model"] is not None and ours["scales"] == [1.0, 0.5]
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    for target, message in (("model.ckpt", "is a pickle file"), ("nothing", "not found")):
        result = runner.invoke(app, ["inspect", str(tmp_path / target)])
        assert result.exit_code == 1 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
