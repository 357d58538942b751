"""The Triton kernels against PyTorch, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py). Shapes are tiny: the interpreter runs every program in Python."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton is not installed")

from deltaconv_cli import kernels  # noqa: E402
from deltaconv_cli.backend import BACKEND_ENV  # noqa: E402
from deltaconv_cli.block import DeltaConvBlock  # noqa: E402

ops = torch.ops.deltaconv


def conv_reference(x, weight, bias):
    k = weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1)


SLOW = pytest.mark.slow  # the larger cases take seconds each in Triton's CPU interpreter
CONV_CASES = [((1, 5, 7, 8), 3), pytest.param((2, 6, 4, 16), 7, marks=SLOW),
              pytest.param((1, 3, 4, 4), 13, marks=SLOW), ((1, 1, 3, 8), 3)]  # fmt: skip


@pytest.mark.parametrize("shape,k", CONV_CASES)
def test_dwconv_forward_and_gradients(shape, k):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(shape[-1], 1, k, k, requires_grad=True)
    bias = torch.randn(shape[-1], requires_grad=True)
    y = ops.dwconv2d(x, weight, bias)
    expected = conv_reference(x, weight, bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, weight, bias), grad)
    theirs = torch.autograd.grad(expected, (x, weight, bias), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 6, 5, 16), torch.randn(16, 1, 7, 7), torch.randn(16)
    y = ops.dwconv2d(x.to(dtype), weight.to(dtype), bias.to(dtype))
    assert y.dtype == dtype
    expected = conv_reference(x.to(dtype).double(), weight.to(dtype).double(), bias.to(dtype).double())
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("gate,code", [("scaled", 0), ("sigmoid", 1)])
def test_fused_conv_gate(gate, code):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 5, 6, 16), torch.randn(16, 1, 5, 5), torch.randn(16)
    v = conv_reference(x, weight, bias)
    a, g = v.chunk(2, dim=-1)
    expected = a * g * 2.0 if gate == "scaled" else a * torch.sigmoid(g)
    torch.testing.assert_close(ops.dwconv2d_gate(x, weight, bias, code, 2.0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,out", [((8, 6), (4, 3)), ((7, 5), (3, 2)), ((9, 4), (4, 2)), ((3, 3), (1, 1))])
def test_avg_pool_matches_adaptive_pooling(size, out):
    torch.manual_seed(0)
    x = torch.randn(2, *size, 8, requires_grad=True)
    y = ops.avg_pool(x, *out)
    expected = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), out).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


@pytest.mark.parametrize(
    "small,big", [((4, 3), (8, 6)), ((3, 2), (7, 5)), ((1, 1), (3, 2)), ((2, 2), (2, 2))]
)
@pytest.mark.parametrize("gate,code", [("scaled", 0), ("sigmoid", 1)])
def test_gate_upsample_matches_interpolate(small, big, gate, code):
    torch.manual_seed(0)
    v = torch.randn(2, *small, 16, requires_grad=True)
    z = ops.gate_upsample(v, *big, code, 1.5)
    a, g = v.chunk(2, dim=-1)
    gated = a * g * 1.5 if gate == "scaled" else a * torch.sigmoid(g)
    expected = F.interpolate(gated.permute(0, 3, 1, 2), size=big, mode="bilinear", align_corners=False)
    expected = expected.permute(0, 2, 3, 1)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(z)
    torch.testing.assert_close(torch.autograd.grad(z, v, grad)[0], torch.autograd.grad(expected, v, grad)[0])


def test_gradcheck_in_float64():
    # fast_mode checks the Jacobian along random directions: the interpreter is slow per call.
    torch.manual_seed(0)
    options = {"dtype": torch.float64, "requires_grad": True}
    x = torch.randn(1, 3, 2, 2, **options)
    weight, bias = torch.randn(2, 1, 3, 3, **options), torch.randn(2, **options)
    assert torch.autograd.gradcheck(ops.dwconv2d, (x, weight, bias), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: ops.avg_pool(t, 1, 1), (x,), fast_mode=True)
    v = torch.randn(1, 2, 1, 4, **options)
    assert torch.autograd.gradcheck(lambda t: ops.gate_upsample(t, 3, 2, 0, 1.3), (v,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: ops.gate_upsample(t, 3, 2, 1, 1.0), (v,), fast_mode=True)


def test_ops_are_registered_with_fake_kernels():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 3, 4, 4, requires_grad=True), torch.randn(4, 1, 3, 3), torch.randn(4)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(ops.dwconv2d, (x, weight, bias), test_utils=checks)
    torch.library.opcheck(ops.avg_pool, (x, 1, 2), test_utils=checks)
    torch.library.opcheck(ops.gate_upsample, (x, 5, 6, 0, 1.0), test_utils=checks)
    torch.library.opcheck(ops.dwconv2d_gate, (x.detach(), weight, bias, 1, 1.0), test_utils=checks[:2])


@pytest.mark.parametrize("gate", ["scaled", pytest.param("sigmoid", marks=SLOW)])
@pytest.mark.parametrize("shape", [(1, 6, 8, 16), pytest.param((2, 7, 5, 16), marks=SLOW)])
def test_block_backends_compute_the_same_function(gate, shape):
    torch.manual_seed(0)
    reference = DeltaConvBlock(shape[-1], 5, gate=gate, backend="torch")
    fast = DeltaConvBlock(shape[-1], 5, gate=gate, backend="triton")
    fast.load_state_dict(reference.state_dict())
    assert list(fast.state_dict()) == list(reference.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():  # the inference path fuses the full-scale gate into the convolution
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)
    out_ref, out_fast = reference(x), fast(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fast.backward(grad)
    for (name, a), b in zip(reference.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_backend_choice(monkeypatch):
    block = DeltaConvBlock(8, 3)
    x = torch.randn(1, 2, 2, 8)
    assert not block.uses_triton(x)  # auto on the CPU: PyTorch
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert block.uses_triton(x)
    assert not DeltaConvBlock(8, 3, backend="torch").uses_triton(x)  # the option beats the variable
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="DELTACONV_BACKEND must be one of auto, torch, triton"):
        block(x)
    assert kernels.GATE_CODES == {"scaled": 0, "sigmoid": 1}
