"""LinFusion's generalized linear attention (the baseline) against docs/method.md §2, mounted as a mixer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_denoiser

from deltaconv_cli.architectures import denoiser_inputs
from deltaconv_cli.linfusion import LinFusionAttention
from deltaconv_cli.surgery import DeltaConvAdapter


def reference(m: LinFusionAttention, x: torch.Tensor) -> torch.Tensor:
    """docs/method.md §2 written out per head with explicit sums."""
    b, h, w, c = x.shape
    t = x.reshape(b, h * w, c)
    q = m.to_q(t + m.mlp_q(t))
    k = m.to_k(t + m.mlp_k(t))
    v = m.to_v(t)
    outs = []
    for head in range(m.heads):
        cols = slice(head * m.dim_head, (head + 1) * m.dim_head)
        pq, pk, vh = F.elu(q[..., cols]) + 1, F.elu(k[..., cols]) + 1, v[..., cols]
        kv = torch.einsum("bnd,bne->bde", pk, vh) / (h * w)
        z = torch.einsum("bnd,bd->bn", pq, pk.mean(dim=1)) + 1e-4
        outs.append(torch.einsum("bnd,bde->bne", pq, kv) / z[..., None])
    return m.to_out(torch.cat(outs, -1)).reshape(b, h, w, c)


@pytest.mark.parametrize("shape", [(2, 4, 6, 16), (1, 7, 3, 32)])
def test_matches_design_formula(shape):
    torch.manual_seed(0)
    module = LinFusionAttention(shape[-1], heads=4, dim_head=shape[-1] // 4).double()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(module, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["sd1", "sdxl", "pixart"])
def test_linfusion_adapter_starts_from_the_attention_projections(layout, tmp_path):
    model = tiny_denoiser(layout)
    adapter = DeltaConvAdapter.construct_for(model, mixer="linfusion")
    for name, block in zip(adapter.config.targets, adapter.blocks, strict=True):
        attn = model.get_submodule(name)
        assert torch.equal(block.to_q.weight, attn.to_q.weight)
        assert torch.equal(block.to_out.weight, attn.to_out[0].weight)
    adapter.save_pretrained(tmp_path)
    loaded = DeltaConvAdapter.from_pretrained(tmp_path).mount(model)
    assert loaded.config.mixer == "linfusion"
    with torch.no_grad():
        out = model(**denoiser_inputs(model, 2, 10, 6)).sample
    assert out.shape[-2:] == (10, 6) and torch.isfinite(out).all()
