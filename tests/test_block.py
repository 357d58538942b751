"""The ΔConvBlock against an independent functional reference of docs/method.md §1.1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deltaconv_cli.block import DeltaConvBlock


def reference(block: DeltaConvBlock, x: torch.Tensor) -> torch.Tensor:
    """docs/method.md §1.1 step by step with torch.nn.functional, reading the block's weights."""
    batch, height, width, channels = x.shape
    inner = block.inner_channels
    u = F.linear(x, block.proj_in.weight, block.proj_in.bias).permute(0, 3, 1, 2)
    gated = []
    for scale, conv in zip(block.scales, block.convs, strict=True):
        if scale == 1.0:
            u_s = u
        else:
            u_s = F.adaptive_avg_pool2d(u, (max(1, int(height * scale)), max(1, int(width * scale))))
        k = conv.weight.shape[-1]
        v = F.conv2d(u_s, conv.weight, conv.bias, padding=k // 2, groups=inner)
        a, g = v[:, : inner // 2], v[:, inner // 2 :]
        z = a * g * math.sqrt(inner / 2) if block.gate == "scaled" else a * torch.sigmoid(g)
        if scale != 1.0:
            z = F.interpolate(z, size=(height, width), mode="bilinear", align_corners=False)
        gated.append(z)
    local = F.linear(torch.cat(gated, 1).permute(0, 2, 3, 1), block.proj_out.weight, block.proj_out.bias)
    pooled = F.linear(x.mean(dim=(1, 2)), block.proj_global.weight, block.proj_global.bias)
    return local + pooled[:, None, None, :]


SHAPES = [(2, 8, 8, 16), (1, 7, 5, 16), (3, 9, 12, 32), (1, 1, 3, 8), (2, 2, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_matches_functional_reference(shape, gate, kernel_size):
    torch.manual_seed(0)
    block = DeltaConvBlock(shape[-1], kernel_size, gate=gate).double()
    x = torch.randn(shape, dtype=torch.float64)
    out = block(x)
    assert out.shape == shape
    torch.testing.assert_close(out, reference(block, x), rtol=1e-12, atol=1e-12)


def test_other_scales_and_inter_ratio():
    torch.manual_seed(0)
    block = DeltaConvBlock(24, 5, scales=(1.0, 0.5, 0.25), inter_ratio=1 / 3).double()
    assert block.inner_channels == 8
    x = torch.randn(2, 11, 6, 24, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference(block, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    torch.manual_seed(0)
    block = DeltaConvBlock(32, 7)
    x = torch.randn(2, 9, 13, 32)
    expected = reference(block.double(), x.double())
    out = block.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    block = DeltaConvBlock(32, 9)
    x = torch.randn(2, 17, 10, 32)
    torch.testing.assert_close(block.cuda()(x.cuda()).cpu(), reference(block.cpu(), x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels,kernel_size", [(64, 3), (320, 7), (1280, 13)])
def test_parameter_count_formula(channels, kernel_size):
    # docs/method.md §1.1: 2C^2 + k^2 C + O(C); O(C) = biases: C/2 (in), 2 x C/2 (convs), C (out), C (global).
    block = DeltaConvBlock(channels, kernel_size)
    expected = 2 * channels**2 + kernel_size**2 * channels + channels // 2 + channels + 2 * channels
    assert sum(p.numel() for p in block.parameters()) == expected


def test_gradients_reach_every_parameter():
    block = DeltaConvBlock(16, 3)
    block(torch.randn(2, 5, 7, 16)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kernel_size": 4}, "odd"),
        ({"kernel_size": 0}, "odd"),
        ({"gate": "relu"}, "gate"),
        ({"scales": (1.0, 0.0)}, "scales"),
        ({"inter_ratio": 0.05}, "even"),
    ],
)
def test_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeltaConvBlock(16, **{"kernel_size": 3, **kwargs})
