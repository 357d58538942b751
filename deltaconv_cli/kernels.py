"""Channels-last Triton kernels for the ΔConvBlock, registered as ``torch.library`` custom ops.

Every tensor here is a contiguous ``(B, H, W, C)`` grid, the layout the block's linear layers produce,
so no permute or copy sits between them. Accumulation is in float32 (float64 for float64 inputs, so
that ``gradcheck`` is meaningful); there are no atomics: the weight gradient is written as per-tile
partial sums and reduced with ``torch.sum``.

- ``dwconv2d``: depthwise k x k convolution, zero padding k // 2, with bias. Backward: the input
  gradient is the same kernel with the taps flipped; the weight gradient has its own kernel.
- ``dwconv2d_gate``: the convolution with the gate fused into its epilogue (the a and g halves are
  computed by the same program), so the C'-channel result never goes to memory. Inference only.
- ``avg_pool``: adaptive average pooling to (floor(H/2), floor(W/2)) with PyTorch's bin edges.
- ``gate_upsample``: the half-scale branch's gate fused with the bilinear upsample back to (H, W)
  (align_corners=False, PyTorch's source-index rule); the gated half-resolution tensor is never stored.

Backward passes of the pooling and of the gate+upsample use PyTorch's own backward operators.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

GATE_CODES = {"scaled": 0, "sigmoid": 1}


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(width: int, channels: int) -> tuple[int, int]:
    block_c = min(64, triton.next_power_of_2(channels))
    block_w = max(1, min(32, triton.next_power_of_2(width), 2048 // block_c))
    return block_w, block_c


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gate(a, g, GATE: tl.constexpr, gate_scale):
    if GATE == 0:
        out = a * g * gate_scale
    else:
        out = a * (1.0 / (1.0 + tl.exp(-g)))
    return out


@triton.jit
def _dwconv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, H, W, C, C_OUT, gate_scale,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, FUSE_GATE: tl.constexpr, GATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One output row segment: BLOCK_W pixels x BLOCK_C channels. With FUSE_GATE the program computes
    channel c and its partner c + C_OUT and stores gate(a, g) into a C_OUT-channel output."""
    pid_row = tl.program_id(0)  # b * H + h
    pid_w = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = pid_row // H
    h = pid_row % H
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C_OUT
    acc_a = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
    acc_g = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
    for i in range(K):
        hh = h + i - K // 2
        row_ok = (offs_w * 0 + hh >= 0) & (offs_w * 0 + hh < H)  # broadcast before combining masks
        row_base = (b * H + hh).to(tl.int64) * W
        for j in tl.static_range(K):
            ww = offs_w + j - K // 2
            m = row_ok & (ww >= 0) & (ww < W)
            ptrs = x_ptr + (row_base + ww)[:, None] * C + offs_c[None, :]
            mask = m[:, None] & mask_c[None, :]
            xa = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
            wa = tl.load(w_ptr + offs_c * (K * K) + i * K + j, mask=mask_c, other=0.0).to(ACC)
            acc_a += xa * wa[None, :]
            if FUSE_GATE:
                xg = tl.load(ptrs + C_OUT, mask=mask, other=0.0).to(ACC)
                wg = tl.load(w_ptr + (offs_c + C_OUT) * (K * K) + i * K + j, mask=mask_c, other=0.0).to(ACC)
                acc_g += xg * wg[None, :]
    if HAS_BIAS:
        acc_a += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
        if FUSE_GATE:
            acc_g += tl.load(b_ptr + offs_c + C_OUT, mask=mask_c, other=0.0).to(ACC)[None, :]
    out = _gate(acc_a, acc_g, GATE, gate_scale) if FUSE_GATE else acc_a
    out_mask = (offs_w < W)[:, None] & mask_c[None, :]
    out_ptrs = y_ptr + ((pid_row.to(tl.int64) * W + offs_w) * C_OUT)[:, None] + offs_c[None, :]
    tl.store(out_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dwconv_weight_grad_kernel(
    x_ptr, dy_ptr, partial_ptr, ROWS_TOTAL, H, W, C,
    K: tl.constexpr, ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Partial sum over ROWS output rows of dy * shifted x, for one tap and one channel block."""
    pid_tile = tl.program_id(0)
    tap = tl.program_id(1)
    pid_c = tl.program_id(2)
    i = tap // K
    j = tap % K
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_C,), dtype=ACC)
    for r in range(ROWS):
        row = pid_tile * ROWS + r
        b = row // H
        h = row % H
        hh = h + i - K // 2
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            live = (offs_w * 0 + row) < ROWS_TOTAL
            ww = offs_w + j - K // 2
            in_ok = (
                live & (offs_w < W) & (ww >= 0) & (ww < W) & (offs_w * 0 + hh >= 0) & (offs_w * 0 + hh < H)
            )
            out_ok = live & (offs_w < W)
            dy = tl.load(
                dy_ptr + ((row.to(tl.int64) * W + offs_w) * C)[:, None] + offs_c[None, :],
                mask=out_ok[:, None] & mask_c[None, :], other=0.0,
            ).to(ACC)  # fmt: skip
            xs = tl.load(
                x_ptr + (((b * H + hh).to(tl.int64) * W + ww) * C)[:, None] + offs_c[None, :],
                mask=in_ok[:, None] & mask_c[None, :], other=0.0,
            ).to(ACC)  # fmt: skip
            acc += tl.sum(dy * xs, axis=0)
    tl.store(partial_ptr + (pid_tile * K * K + tap) * C + offs_c, acc, mask=mask_c)


@triton.jit
def _avg_pool_kernel(
    x_ptr, y_ptr, H, W, C, HO, WO,
    MAX_BIN: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Adaptive average pooling with PyTorch's bins: rows [floor(i H / HO), ceil((i + 1) H / HO))."""
    pid_row = tl.program_id(0)  # b * HO + i
    pid_w = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = pid_row // HO
    i = pid_row % HO
    offs_j = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    row_start = (i * H) // HO
    row_end = ((i + 1) * H + HO - 1) // HO
    col_start = (offs_j * W) // WO
    col_end = ((offs_j + 1) * W + WO - 1) // WO
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
    for di in tl.static_range(MAX_BIN):
        hh = row_start + di
        for dj in tl.static_range(MAX_BIN):
            ww = col_start + dj
            m = (offs_j < WO) & (ww < col_end) & (offs_j * 0 + hh < row_end)
            ptrs = x_ptr + (((b * H + hh).to(tl.int64) * W + ww) * C)[:, None] + offs_c[None, :]
            acc += tl.load(ptrs, mask=m[:, None] & mask_c[None, :], other=0.0).to(ACC)
    count = ((row_end - row_start) * (col_end - col_start)).to(ACC)
    out = acc / count[:, None]
    out_ptrs = y_ptr + ((pid_row.to(tl.int64) * WO + offs_j) * C)[:, None] + offs_c[None, :]
    tl.store(out_ptrs, out.to(y_ptr.dtype.element_ty), mask=(offs_j < WO)[:, None] & mask_c[None, :])


@triton.jit
def _gate_upsample_kernel(
    v_ptr, z_ptr, h, w, H, W, C_OUT, scale_h, scale_w, gate_scale,
    GATE: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """z[Y, X] = bilinear upsample of gate(a, g) from (h, w) to (H, W); v holds a then g (2 C_OUT)."""
    pid_row = tl.program_id(0)  # b * H + Y
    pid_w = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = pid_row // H
    y = pid_row % H
    offs_x = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C_OUT
    # PyTorch's area_pixel_compute_source_index for align_corners=False, clamped at 0.
    sy = tl.maximum((y + 0.5) * scale_h - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    y1 = tl.minimum(y0 + 1, h - 1)
    ly = sy - y0
    sx = tl.maximum((offs_x + 0.5) * scale_w - 0.5, 0.0)
    x0 = sx.to(tl.int32)
    x1 = tl.minimum(x0 + 1, w - 1)
    lx = sx - x0
    mask = (offs_x < W)[:, None] & mask_c[None, :]
    out = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
    for corner in tl.static_range(4):
        yy = y0 if corner < 2 else y1
        xx = x0 if corner % 2 == 0 else x1
        wy = (1.0 - ly) if corner < 2 else ly
        wx = (1.0 - lx) if corner % 2 == 0 else lx
        base = (((b * h + yy).to(tl.int64) * w + xx) * (2 * C_OUT))[:, None] + offs_c[None, :]
        a = tl.load(v_ptr + base, mask=mask, other=0.0).to(ACC)
        g = tl.load(v_ptr + base + C_OUT, mask=mask, other=0.0).to(ACC)
        out += (wy * wx)[:, None].to(ACC) * _gate(a, g, GATE, gate_scale)
    out_ptrs = z_ptr + ((pid_row.to(tl.int64) * W + offs_x) * C_OUT)[:, None] + offs_c[None, :]
    tl.store(out_ptrs, out.to(z_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


def _launch_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fuse_gate: bool,
                   gate: int, gate_scale: float) -> torch.Tensor:  # fmt: skip
    batch, height, width, channels = x.shape
    k = weight.shape[-1]
    c_out = channels // 2 if fuse_gate else channels
    y = torch.empty((batch, height, width, c_out), device=x.device, dtype=x.dtype)
    block_w, block_c = _blocks(width, c_out)
    grid = (batch * height, triton.cdiv(width, block_w), triton.cdiv(c_out, block_c))
    _dwconv_kernel[grid](
        x, weight.contiguous(), x if bias is None else bias, y, height, width, channels, c_out, gate_scale,
        K=k, HAS_BIAS=bias is not None, FUSE_GATE=fuse_gate, GATE=gate, ACC=_acc_dtype(x.dtype),
        BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    return y


def _launch_weight_grad(x: torch.Tensor, dy: torch.Tensor, k: int) -> torch.Tensor:
    batch, height, width, channels = x.shape
    rows_total = batch * height
    rows = min(16, rows_total)  # output rows summed per program
    tiles = triton.cdiv(rows_total, rows)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty((tiles, k * k, channels), device=x.device, dtype=acc_dtype)
    block_w, block_c = _blocks(width, channels)
    grid = (tiles, k * k, triton.cdiv(channels, block_c))
    _dwconv_weight_grad_kernel[grid](
        x, dy, partial, rows_total, height, width, channels,
        K=k, ROWS=rows, ACC=_acc_dtype(x.dtype), BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    return partial.sum(0).transpose(0, 1).reshape(channels, 1, k, k)


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("deltaconv::dwconv2d", mutates_args=())
def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise convolution of a contiguous (B, H, W, C) grid; ``weight`` is (C, 1, k, k)."""
    return _launch_dwconv(x.contiguous(), weight, bias, False, 0, 1.0)


@dwconv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x)


def _dwconv_setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library protocol
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _dwconv_backward(ctx, grad):  # noqa: ANN001 - torch.library protocol
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        # The transpose of a stride-1, same-padded convolution is the convolution with flipped taps.
        grad_x = dwconv2d(grad, weight.flip(-1, -2).contiguous(), None)
    if ctx.needs_input_grad[1]:
        grad_w = _launch_weight_grad(x.contiguous(), grad, weight.shape[-1]).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum(dim=(0, 1, 2), dtype=torch.float32).to(weight.dtype)
    return grad_x, grad_w, grad_b


dwconv2d.register_autograd(_dwconv_backward, setup_context=_dwconv_setup)


@torch.library.custom_op("deltaconv::dwconv2d_gate", mutates_args=())
def dwconv2d_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: int,
                  gate_scale: float) -> torch.Tensor:  # fmt: skip
    """gate(a, g) of the depthwise convolution's two channel halves, in one pass (inference only)."""
    return _launch_dwconv(x.contiguous(), weight, bias, True, gate, gate_scale)


@dwconv2d_gate.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: int, gate_scale: float
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("deltaconv::avg_pool", mutates_args=())
def avg_pool(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Adaptive average pooling of a (B, H, W, C) grid to (B, out_h, out_w, C)."""
    x = x.contiguous()
    batch, height, width, channels = x.shape
    y = torch.empty((batch, out_h, out_w, channels), device=x.device, dtype=x.dtype)
    max_bin = max(math.ceil(height / out_h), math.ceil(width / out_w)) + 1
    block_w, block_c = _blocks(out_w, channels)
    grid = (batch * out_h, triton.cdiv(out_w, block_w), triton.cdiv(channels, block_c))
    _avg_pool_kernel[grid](
        x, y, height, width, channels, out_h, out_w,
        MAX_BIN=max_bin, ACC=_acc_dtype(x.dtype), BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    return y


@avg_pool.register_fake
def _(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_h, out_w, x.shape[-1]))


def _avg_pool_setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library protocol
    ctx.input_shape = inputs[0].shape


def _avg_pool_backward(ctx, grad):  # noqa: ANN001 - torch.library protocol
    batch, height, width, channels = ctx.input_shape
    template = grad.new_empty((batch, channels, height, width))
    grad_x = torch.ops.aten._adaptive_avg_pool2d_backward(grad.permute(0, 3, 1, 2), template)
    return grad_x.permute(0, 2, 3, 1), None, None


avg_pool.register_autograd(_avg_pool_backward, setup_context=_avg_pool_setup)


@torch.library.custom_op("deltaconv::gate_upsample", mutates_args=())
def gate_upsample(v: torch.Tensor, out_h: int, out_w: int, gate: int, gate_scale: float) -> torch.Tensor:
    """Bilinear upsample (align_corners=False) of gate(a, g), v = [a | g] (B, h, w, 2C), to (out_h, out_w)."""
    v = v.contiguous()
    batch, height, width, channels = v.shape
    c_out = channels // 2
    z = torch.empty((batch, out_h, out_w, c_out), device=v.device, dtype=v.dtype)
    block_w, block_c = _blocks(out_w, c_out)
    grid = (batch * out_h, triton.cdiv(out_w, block_w), triton.cdiv(c_out, block_c))
    _gate_upsample_kernel[grid](
        v, z, height, width, out_h, out_w, c_out, height / out_h, width / out_w, gate_scale,
        GATE=gate, ACC=_acc_dtype(v.dtype), BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    return z


@gate_upsample.register_fake
def _(v: torch.Tensor, out_h: int, out_w: int, gate: int, gate_scale: float) -> torch.Tensor:
    return v.new_empty((v.shape[0], out_h, out_w, v.shape[-1] // 2))


def _gate_upsample_setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library protocol
    v, _, _, gate, gate_scale = inputs
    ctx.save_for_backward(v)
    ctx.gate, ctx.gate_scale = gate, gate_scale


def _gate_upsample_backward(ctx, grad):  # noqa: ANN001 - torch.library protocol
    (v,) = ctx.saved_tensors
    batch, height, width, channels = v.shape
    out_h, out_w = grad.shape[1:3]
    a, g = v.float().chunk(2, dim=-1)
    grad_gated = torch.ops.aten.upsample_bilinear2d_backward(
        grad.float().permute(0, 3, 1, 2), [out_h, out_w], [batch, channels // 2, height, width], False
    ).permute(0, 2, 3, 1)
    if ctx.gate == GATE_CODES["scaled"]:
        grad_a, grad_g = grad_gated * g * ctx.gate_scale, grad_gated * a * ctx.gate_scale
    else:
        s = torch.sigmoid(g)
        grad_a, grad_g = grad_gated * s, grad_gated * a * s * (1 - s)
    return torch.cat([grad_a, grad_g], dim=-1).to(v.dtype), None, None, None, None


gate_upsample.register_autograd(_gate_upsample_backward, setup_context=_gate_upsample_setup)
