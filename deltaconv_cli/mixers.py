"""The token mixers an adapter can put in place of self-attention, by name.

Each entry says how a mixer is built for one self-attention site, how it starts from the attention it
replaces, and how reports label it. The adapter, ``profile``, ``distill`` and the CLI read this table:
adding a mixer is adding an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .block import DeltaConvBlock
from .errors import DeltaConvError
from .linfusion import LinFusionAttention


@dataclass(frozen=True)
class Mixer:
    """One kind of token mixer.

    Attributes:
        name: the name in adapter configs, recipes and ``--mixer``.
        label: its name in tables and plots.
        build: ``(channels, heads, kernel_size, mid_dim, qkv_bias, **options) -> module`` mapping a
            ``(B, H, W, C)`` grid to a grid of the same shape; ``options`` are the adapter's ``scales``,
            ``inter_ratio`` and ``gate``.
        initialisers: how a new module starts, by the name of the initialisation (:data:`INITS`):
            ``(module, attention)`` sets the module from the diffusers ``Attention`` it replaces (a
            no-op keeps PyTorch's random initialisation).
        per_site: the adapter config lists (besides ``channels``) each module needs: ``kernel_sizes``
            and/or ``heads``.
        optional_per_site: per-site lists a module may be given (``projection_mid_dims``: LinFusion's
            feature-MLP widths, where they are not the default).
    """

    name: str
    label: str
    build: Callable[..., nn.Module]
    initialisers: dict[str, Callable[[nn.Module, nn.Module], None]]
    per_site: tuple[str, ...]
    optional_per_site: tuple[str, ...] = ()


def _deltaconv(channels: int, heads: int | None, kernel_size: int | None, mid_dim: int | None,
               qkv_bias: bool, **options: Any) -> DeltaConvBlock:  # fmt: skip
    return DeltaConvBlock(channels, kernel_size, **options)


def _linfusion(channels: int, heads: int | None, kernel_size: int | None, mid_dim: int | None,
               qkv_bias: bool, **options: Any) -> LinFusionAttention:  # fmt: skip
    return LinFusionAttention(channels, heads, channels // heads, qkv_bias, mid_dim)


def _random_start(module: nn.Module, attention: nn.Module) -> None:
    """The ΔConv authors' start: PyTorch's default initialisation, nothing taken from the attention."""


@torch.no_grad()
def _from_attention(block: DeltaConvBlock, attention: Attention) -> None:
    """Start the block from the attention it replaces (docs/method.md §1.4).

    Global branch: the attention's uniform limit. When every softmax row is uniform, each token's output
    is ``to_out(mean(to_v(x))) = W_out W_v mean(x) + W_out b_v + b_out`` (over the attention's
    ``rescale_output_factor``), which is exactly ``proj_global(mean(x))``.
    Local branch: linear local averaging of the value path, silent until fitted. The first half of
    ``proj_in`` (the gated half ``a``) projects onto the leading right singular vectors of
    ``W_out W_v``; each depthwise convolution averages it with a normalised Gaussian window
    (sigma = k / 4); the gate half ``g`` is constant (zero weights, its bias makes the gate pass ``a``
    through), so the branch starts linear and can learn its non-linearity; ``proj_out`` starts at zero.
    :func:`deltaconv_cli.calibration.calibrate` then fits ``proj_out`` and ``proj_global`` to the
    attention's outputs by least squares."""
    to_v, to_out = attention.to_v, attention.to_out[0]
    weight = to_out.weight.float() @ to_v.weight.float()
    bias = to_out.bias.float() if to_out.bias is not None else weight.new_zeros(weight.shape[0])
    if to_v.bias is not None:
        bias = bias + to_out.weight.float() @ to_v.bias.float()
    scale = attention.rescale_output_factor
    block.proj_global.weight.copy_(weight / scale)
    block.proj_global.bias.copy_(bias / scale)
    half = block.inner_channels // 2
    directions = torch.linalg.svd(weight.double().cpu())[2][:half]  # leading right singular vectors
    block.proj_in.weight[:half] = directions.to(block.proj_in.weight)
    block.proj_in.bias[:half] = 0
    for conv in block.convs:
        k = conv.kernel_size[0]
        offsets = torch.arange(k, dtype=torch.float64) - k // 2
        window = torch.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * (k / 4) ** 2))
        conv.weight[:half] = (window / window.sum()).to(conv.weight)
        conv.bias[:half] = 0
        conv.weight[half:] = 0
        conv.bias[half:] = 1 / block.gate_scale if block.gate == "scaled" else 0.0
    block.proj_out.weight.zero_()
    block.proj_out.bias.zero_()


def _copy_projections(module: nn.Module, attention: nn.Module) -> None:
    module.copy_projections(attention)


INITS = ("teacher", "random")  # ΔConv: from the attention it replaces, or the ΔConv authors' start
MIXERS: dict[str, Mixer] = {
    "deltaconv": Mixer(
        "deltaconv",
        "ΔConv",
        _deltaconv,
        {"teacher": _from_attention, "random": _random_start},
        ("kernel_sizes",),
    ),
    # Both names copy the attention's projections into LinFusion's blocks: that start is ours (LinFusion's
    # trainer starts from random projections), kept for "random" too so that --init changes only ΔConv.
    "linfusion": Mixer(
        "linfusion",
        "LinFusion",
        _linfusion,
        dict.fromkeys(INITS, _copy_projections),
        ("heads",),
        ("projection_mid_dims",),
    ),
}


def check_init(name: str) -> str:
    if name not in INITS:
        raise DeltaConvError(f"init must be one of {', '.join(INITS)}, got {name!r}")
    return name


def get_mixer(name: str) -> Mixer:
    """The mixer called ``name``; a clear error naming the others."""
    try:
        return MIXERS[name]
    except KeyError:
        raise DeltaConvError(f"mixer must be one of {', '.join(MIXERS)}, got {name!r}") from None
