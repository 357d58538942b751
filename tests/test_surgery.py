"""Finding self-attention sites, mounting ΔConv blocks, the token grid, and the adapter's round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from tiny_models import tiny_denoiser

from deltaconv_cli.architectures import BUILTIN_ARCHITECTURES, denoiser_inputs, meta_denoiser
from deltaconv_cli.errors import DeltaConvError
from deltaconv_cli.surgery import (
    DeltaConvAdapter,
    ReplacedSelfAttention,
    default_kernel_sizes,
    find_self_attention_sites,
    mounted_adapter,
    resolve_kernel_sizes,
    trace_token_grids,
)

UNET_LAYOUTS = ["sd1", "sd2", "sdxl"]
ALL_LAYOUTS = [*UNET_LAYOUTS, "pixart"]


def inputs(model, batch=2, height=12, width=20, seed=0):
    return denoiser_inputs(model, batch, height, width, generator=torch.Generator().manual_seed(seed))


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


@pytest.mark.parametrize("name,count", [("sd15", 16), ("sd21", 16), ("sdxl", 70), ("pixart-sigma", 28)])
def test_site_count_of_reference_models(name, count):
    sites = find_self_attention_sites(meta_denoiser(*BUILTIN_ARCHITECTURES[name]))
    assert len(sites) == count
    assert all(s.name.endswith(".attn1") for s in sites)


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "sd15",
            {
                "down_blocks.0": 7,
                "down_blocks.1": 9,
                "down_blocks.2": 5,
                "mid_block": 3,
                "up_blocks.1": 5,
                "up_blocks.2": 9,
                "up_blocks.3": 11,
            },
        ),
        (
            "sdxl",
            {"down_blocks.1": 9, "down_blocks.2": 7, "mid_block": 9, "up_blocks.0": 9, "up_blocks.1": 13},
        ),
        ("pixart-sigma", {"transformer_blocks": 13}),
    ],
)
def test_authors_kernel_sizes(name, expected):
    assert default_kernel_sizes(meta_denoiser(*BUILTIN_ARCHITECTURES[name])) == expected


def test_sd15_token_grids_at_1024px():
    grids = trace_token_grids(meta_denoiser(*BUILTIN_ARCHITECTURES["sd15"]), 128, 96)
    by_stage = {name.split(".attentions")[0]: grid for name, grid in grids.items()}
    assert by_stage == {
        "down_blocks.0": (128, 96),
        "down_blocks.1": (64, 48),
        "down_blocks.2": (32, 24),
        "mid_block": (16, 12),
        "up_blocks.1": (32, 24),
        "up_blocks.2": (64, 48),
        "up_blocks.3": (128, 96),
    }


def test_pixart_grid_is_latent_over_patch_size():
    grids = trace_token_grids(meta_denoiser(*BUILTIN_ARCHITECTURES["pixart-sigma"]), 128, 64)
    assert set(grids.values()) == {(64, 32)}


def test_kernel_size_overrides():
    unet = tiny_denoiser("sd1")
    sites = find_self_attention_sites(unet)
    assert resolve_kernel_sizes(unet, 5) == [5] * len(sites)
    sizes = resolve_kernel_sizes(unet, {"mid_block": 1, sites[0].name: 13})
    assert sizes[0] == 13
    assert [k for s, k in zip(sites, sizes, strict=True) if s.stage == "mid_block"] == [1]
    with pytest.raises(DeltaConvError, match="unknown layer or stage 'down_blocks.7'"):
        resolve_kernel_sizes(unet, {"down_blocks.7": 3})
    with pytest.raises(DeltaConvError, match="positive odd"):
        DeltaConvAdapter.construct_for(unet, {"mid_block": 4})


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_mount_replaces_only_self_attention(layout):
    model = tiny_denoiser(layout)
    before = dict(model.named_modules())
    adapter = DeltaConvAdapter.construct_for(model, seed=0).mount(model)
    targets = set(adapter.config.targets)
    for name, module in model.named_modules():
        if name in targets:
            assert isinstance(module, ReplacedSelfAttention)
            assert module.original is before[name]
        elif name.endswith("attn2"):
            assert module is before[name] and isinstance(module, Attention)
    replaced = {name for name, m in model.named_modules() if isinstance(m, ReplacedSelfAttention)}
    assert replaced == targets
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}
    assert mounted_adapter(model) is adapter


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_unmount_restores_exact_outputs(layout):
    model = tiny_denoiser(layout)
    kwargs = inputs(model)
    reference = run(model, kwargs)
    keys = list(model.state_dict())
    adapter = DeltaConvAdapter.construct_for(model, seed=0).mount(model)
    converted = run(model, kwargs)
    assert converted.shape == reference.shape and not torch.equal(converted, reference)
    with adapter.bypassed():
        assert torch.equal(run(model, kwargs), reference)
    adapter.unmount()
    assert torch.equal(run(model, kwargs), reference)
    assert list(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())
    assert mounted_adapter(model) is None


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("size", [(16, 16), (12, 20), (9, 14)])
def test_blocks_see_the_stage_grid(layout, size):
    model = tiny_denoiser(layout)
    expected = trace_token_grids(model, *size)
    adapter = DeltaConvAdapter.construct_for(model).mount(model)
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, ReplacedSelfAttention):
            module.block.register_forward_pre_hook(
                lambda m, args, name=name: seen.update({name: tuple(args[0].shape)})
            )
    run(model, inputs(model, batch=4, height=size[0], width=size[1]))  # batch doubled as under CFG
    assert {n: s[1:3] for n, s in seen.items()} == expected
    assert {s[0] for s in seen.values()} == {4}
    assert len(seen) == len(adapter.blocks)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_denoiser("sd1")
        adapter = DeltaConvAdapter.construct_for(model, seed=0).mount(model)
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(**inputs(model, height=12, width=10)).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in adapter.parameters()])
        assert all(p.grad is None for n, p in model.named_parameters() if ".block." not in n)
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mount_follows_model_dtype(dtype):
    model = tiny_denoiser("sd1").to(dtype)
    adapter = DeltaConvAdapter.construct_for(model).mount(model)
    assert {p.dtype for p in adapter.parameters()} == {dtype}
    out = run(model, inputs(model, batch=1, height=8, width=12))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_save_and_load_round_trip(tmp_path):
    model = tiny_denoiser("sdxl")
    kwargs = inputs(model)
    adapter = DeltaConvAdapter.construct_for(model, {"mid_block": 5}, gate="sigmoid", seed=3)
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    loaded = DeltaConvAdapter.from_pretrained(tmp_path)
    assert loaded.config.targets == adapter.config.targets
    assert loaded.config.kernel_sizes == adapter.config.kernel_sizes
    assert loaded.config.gate == "sigmoid"
    twin = copy.deepcopy(model)
    adapter.mount(model)
    loaded.mount(twin)
    assert torch.equal(run(model, kwargs), run(twin, kwargs))


def test_seed_makes_initialisation_reproducible():
    model = tiny_denoiser("sd1")
    a, b = (DeltaConvAdapter.construct_for(model, seed=7) for _ in range(2))
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_mismatched_adapter_is_refused():
    adapter = DeltaConvAdapter.construct_for(tiny_denoiser("sd1"))
    with pytest.raises(DeltaConvError, match="adapter does not match this model"):
        adapter.mount(tiny_denoiser("sdxl"))
    with pytest.raises(
        DeltaConvError, match="built for a UNet2DConditionModel, not a PixArtTransformer2DModel"
    ):
        adapter.mount(tiny_denoiser("pixart"))


def test_double_mount_is_refused_but_the_base_model_stays_readable():
    model = tiny_denoiser("sd1")
    fresh = DeltaConvAdapter.construct_for(model, seed=0)
    DeltaConvAdapter.construct_for(model, seed=1).mount(model)
    # The base model's sites are still known under mounted blocks: a second adapter can be built ...
    again = DeltaConvAdapter.construct_for(model, seed=0)
    for key, value in fresh.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    # ... but not mounted on top of the first.
    with pytest.raises(DeltaConvError, match="already has ΔConv blocks mounted"):
        again.mount(model)


def test_unsupported_model_names_supported_ones():
    model = UNet2DModel(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    with pytest.raises(
        DeltaConvError, match=r"unsupported model class UNet2DModel; supported: UNet2DConditionModel"
    ):
        DeltaConvAdapter.construct_for(model)
