"""The ΔConvBlock: a pyramid of depthwise convolutions plus a global pooling branch (docs/method.md §1.1).

It takes the place of a self-attention layer. Input and output are channels-last token grids
``(B, H, W, C)``; cost grows linearly with H * W.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as backends

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
        backend: ``"auto"`` (Triton kernels on CUDA when Triton is installed and they pass their
            self-check, PyTorch otherwise, unless the DELTACONV_BACKEND environment variable says "torch"
            or "triton"), ``"torch"`` or ``"triton"`` (the kernels, a failed self-check an error). Both
            compute the same function with the same parameters.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        scales: Sequence[float] = (1.0, 0.5),
        inter_ratio: float = 0.5,
        gate: str = "scaled",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(backends.BACKENDS)}, got {backend!r}")
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
        self.backend = backend
        self.gate_scale = math.sqrt(inner / 2)

        self.proj_in = nn.Linear(channels, inner)
        self.convs = nn.ModuleList(
            nn.Conv2d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner) for _ in scales
        )
        self.proj_out = nn.Linear(len(scales) * inner // 2, channels)
        self.proj_global = nn.Linear(channels, channels)

    def _gate(self, v: torch.Tensor, dim: int) -> torch.Tensor:
        a, g = v.chunk(2, dim=dim)
        if self.gate == "scaled":
            return a * g * self.gate_scale
        return a * torch.sigmoid(g)

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether this call runs the Triton kernels (see ``backend``): the first call of each kind checks
        them against PyTorch, and a failure falls back to PyTorch with a warning, or is an error where
        Triton was forced (:mod:`deltaconv_cli.backend`)."""
        return backends.uses_triton(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix a ``(B, H, W, C)`` grid; returns the same shape."""
        return self.proj_out(self.local_features(x)) + self.proj_global(x.mean(dim=(1, 2), keepdim=True))

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """The gated branches, concatenated: ``(B, H, W, len(scales) * C'/2)``, what ``proj_out`` reads."""
        return self._local_triton(x) if self.uses_triton(x) else self._local_torch(x)

    def _local_torch(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, _ = x.shape
        # (B, C', H, W) view of channels-last memory: convolutions run in channels_last layout.
        u = self.proj_in(x).permute(0, 3, 1, 2)
        gated = []
        for scale, conv in zip(self.scales, self.convs, strict=True):
            u_s = u if scale == 1.0 else F.adaptive_avg_pool2d(u, scale_grid_size(height, width, scale))
            z_s = self._gate(conv(u_s), dim=1)
            if z_s.shape[-2:] != (height, width):
                z_s = F.interpolate(z_s, size=(height, width), mode="bilinear", align_corners=False)
            gated.append(z_s)
        return torch.cat(gated, dim=1).permute(0, 2, 3, 1)

    def _local_triton(self, x: torch.Tensor) -> torch.Tensor:
        from . import kernels  # imports triton; only on this path

        ops = torch.ops.deltaconv
        _, height, width, _ = x.shape
        u = self.proj_in(x).contiguous()
        gate = kernels.GATE_CODES[self.gate]
        # Without autograd the full-scale gate runs inside the convolution's epilogue.
        inference = not (torch.is_grad_enabled() and (u.requires_grad or self.convs[0].weight.requires_grad))
        gated = []
        for scale, conv in zip(self.scales, self.convs, strict=True):
            if scale == 1.0 and inference:
                gated.append(ops.dwconv2d_gate(u, conv.weight, conv.bias, gate, self.gate_scale))
            elif scale == 1.0:
                gated.append(self._gate(ops.dwconv2d(u, conv.weight, conv.bias), dim=-1))
            else:
                pooled = ops.avg_pool(u, *scale_grid_size(height, width, scale))
                v = ops.dwconv2d(pooled, conv.weight, conv.bias)
                gated.append(ops.gate_upsample(v, height, width, gate, self.gate_scale))
        return torch.cat(gated, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, scales={self.scales}, "
            f"inner_channels={self.inner_channels}, gate={self.gate!r}"
        )
