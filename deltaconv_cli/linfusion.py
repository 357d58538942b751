"""LinFusion's generalized linear attention (Liu et al. 2024; docs/method.md §2), the peer we compare against.

q = to_q(x + mlp_q(x)), k = to_k(x + mlp_k(x)), v = to_v(x), with mlp = Linear(C, m)-LayerNorm(m)-LeakyReLU-
Linear(m, C) of hidden width m (LinFusion's ``projection_mid_dim``: C by default, C/16 in LinFusion-XL; -1
is no MLP, where LinFusion's identity makes the input of to_q and to_k x + x); phi = elu + 1 on q and k;
per head out = phi(q) (phi(k)^T v / N) / (phi(q) mean(phi(k)) + 1e-4); to_out. Like the ΔConvBlock it
maps a ``(B, H, W, C)`` grid to a grid of the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

NO_FEATURE_MLP = -1  # LinFusion's projection_mid_dim for "no MLP" (an identity)


def _feature_mlp(channels: int, mid_dim: int | None) -> nn.Module:
    if mid_dim == NO_FEATURE_MLP:
        return nn.Identity()
    width = channels if mid_dim is None else mid_dim
    if width < 1:
        raise ValueError(f"the feature MLP's hidden width must be positive or -1 (no MLP), got {mid_dim}")
    return nn.Sequential(
        nn.Linear(channels, width), nn.LayerNorm(width), nn.LeakyReLU(), nn.Linear(width, channels)
    )


class LinFusionAttention(nn.Module):
    """Generalized linear attention over the tokens of a grid; cost linear in H * W.

    ``mid_dim`` is the hidden width of the feature MLPs (LinFusion's ``projection_mid_dim``): None for C,
    a positive width, or -1 for none.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, qkv_bias: bool = False, mid_dim: int | None = None
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.channels, self.heads, self.dim_head, self.mid_dim = channels, heads, dim_head, mid_dim
        self.to_q = nn.Linear(channels, inner, bias=qkv_bias)
        self.to_k = nn.Linear(channels, inner, bias=qkv_bias)
        self.to_v = nn.Linear(channels, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, channels)
        self.mlp_q = _feature_mlp(channels, mid_dim)
        self.mlp_k = _feature_mlp(channels, mid_dim)

    @torch.no_grad()
    def copy_projections(self, attn: Attention) -> None:
        """Start from a diffusers self-attention: copy its q/k/v/out projections. This start is ours:
        LinFusion's own trainer (``src/train/distill.py``) builds a fresh ``LinFusion`` whose projections
        start from PyTorch's random initialisation."""
        for name in ("to_q", "to_k", "to_v"):
            getattr(self, name).load_state_dict(getattr(attn, name).state_dict())
        self.to_out.load_state_dict(attn.to_out[0].state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # (B, h, N, d)

        q = F.elu(heads(self.to_q(tokens + self.mlp_q(tokens)))) + 1.0
        k = F.elu(heads(self.to_k(tokens + self.mlp_k(tokens)))) + 1.0
        v = heads(self.to_v(tokens))
        # phi(k)^T v / N with both factors scaled by N^-1/2 first, so that fp16 sums over N do not overflow.
        scale = tokens.shape[1] ** -0.5
        kv = (k * scale).transpose(-2, -1) @ (v * scale)  # (B, h, d, d)
        normaliser = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4  # (B, h, N, 1)
        out = (q @ kv) / normaliser
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return out.reshape(batch, height, width, channels)
