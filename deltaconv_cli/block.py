"""The ΔConvBlock: a pyramid of depthwise convolutions plus a global pooling branch (DESIGN 1.1).

It takes the place of a self-attention layer. Input and output are channels-last token grids
``(B, H, W, C)``; cost grows linearly with H * W.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("scaled", "sigmoid")


def scale_grid_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Grid size of the branch at ``scale``: floor of the scaled size, at least one position."""
    if scale == 1.0:
        return height, width
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


class DeltaConvBlock(nn.Module):
    """Pyramid depthwise-convolution token mixer that replaces self-attention.

    Args:
        channels: C, the width of the token stream.
        kernel_size: odd k of the depthwise k x k convolutions (zero padding k // 2).
        scales: resolution of each branch relative to the grid, each in (0, 1].
        inter_ratio: C' / C, the width of the convolution branches.
        gate: ``"scaled"`` (a * g * sqrt(C'/2), the paper's scaled simple gate) or ``"sigmoid"``
            (a * sigmoid(g), the official PixArt variant).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        scales: Sequence[float] = (1.0, 0.5),
        inter_ratio: float = 0.5,
        gate: str = "scaled",
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
        scales = tuple(float(s) for s in scales)
        if not scales or any(not 0.0 < s <= 1.0 for s in scales):
            raise ValueError(f"scales must be in (0, 1], got {scales}")
        inner = round(channels * inter_ratio)
        if inner < 2 or inner % 2:
            raise ValueError(
                f"channels * inter_ratio must be an even number >= 2, got {channels} * {inter_ratio}"
            )
        self.channels = channels
        self.kernel_size = kernel_size
        self.scales = scales
        self.inner_channels = inner
        self.gate = gate
        self.gate_scale = math.sqrt(inner / 2)

        self.proj_in = nn.Linear(channels, inner)
        self.convs = nn.ModuleList(
            nn.Conv2d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner) for _ in scales
        )
        self.proj_out = nn.Linear(len(scales) * inner // 2, channels)
        self.proj_global = nn.Linear(channels, channels)

    def _gate(self, v: torch.Tensor) -> torch.Tensor:
        a, g = v.chunk(2, dim=1)
        if self.gate == "scaled":
            return a * g * self.gate_scale
        return a * torch.sigmoid(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix a ``(B, H, W, C)`` grid; returns the same shape."""
        _, height, width, _ = x.shape
        # (B, C', H, W) view of channels-last memory: convolutions run in channels_last layout.
        u = self.proj_in(x).permute(0, 3, 1, 2)
        gated = []
        for scale, conv in zip(self.scales, self.convs, strict=True):
            u_s = u if scale == 1.0 else F.adaptive_avg_pool2d(u, scale_grid_size(height, width, scale))
            z_s = self._gate(conv(u_s))
            if z_s.shape[-2:] != (height, width):
                z_s = F.interpolate(z_s, size=(height, width), mode="bilinear", align_corners=False)
            gated.append(z_s)
        y_local = self.proj_out(torch.cat(gated, dim=1).permute(0, 2, 3, 1))
        y_global = self.proj_global(x.mean(dim=(1, 2), keepdim=True))
        return y_local + y_global

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, scales={self.scales}, "
            f"inner_channels={self.inner_channels}, gate={self.gate!r}"
        )
