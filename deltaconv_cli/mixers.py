"""The token mixers an adapter can put in place of self-attention, by name.

Each entry says how a mixer is built for one self-attention site, how it starts from the attention it
replaces, and how reports label it. The adapter, ``profile``, ``distill`` and the CLI read this table:
adding a mixer is adding an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
        build: ``(channels, heads, kernel_size, qkv_bias, **options) -> module`` mapping a
            ``(B, H, W, C)`` grid to a grid of the same shape; ``options`` are the adapter's ``scales``,
            ``inter_ratio`` and ``gate``.
        initialise: ``(module, attention)``: start the module from the diffusers ``Attention`` it
            replaces (a no-op for a mixer that starts from random weights).
        per_site: the adapter config lists (besides ``channels``) each module needs: ``kernel_sizes``
            and/or ``heads``.
    """

    name: str
    label: str
    build: Callable[..., nn.Module]
    initialise: Callable[[nn.Module, nn.Module], None]
    per_site: tuple[str, ...]


def _deltaconv(channels: int, heads: int | None, kernel_size: int | None, qkv_bias: bool,
               **options: Any) -> DeltaConvBlock:  # fmt: skip
    return DeltaConvBlock(channels, kernel_size, **options)


def _linfusion(channels: int, heads: int | None, kernel_size: int | None, qkv_bias: bool,
               **options: Any) -> LinFusionAttention:  # fmt: skip
    return LinFusionAttention(channels, heads, channels // heads, qkv_bias)


def _random_start(module: nn.Module, attention: nn.Module) -> None:
    """The authors' start: PyTorch's default initialisation, nothing taken from the attention."""


def _copy_projections(module: nn.Module, attention: nn.Module) -> None:
    module.copy_projections(attention)


MIXERS: dict[str, Mixer] = {
    "deltaconv": Mixer("deltaconv", "ΔConv", _deltaconv, _random_start, ("kernel_sizes",)),
    "linfusion": Mixer("linfusion", "LinFusion", _linfusion, _copy_projections, ("heads",)),
}


def get_mixer(name: str) -> Mixer:
    """The mixer called ``name``; a clear error naming the others."""
    try:
        return MIXERS[name]
    except KeyError:
        raise DeltaConvError(f"mixer must be one of {', '.join(MIXERS)}, got {name!r}") from None
