"""Check and time the ΔConvBlock's Triton kernels against PyTorch, self-attention and LinFusion.

    python benchmarks/triton_kernels.py --out benchmarks/triton-kernels-gpu.json  # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/triton_kernels.py --device cpu --quick   # a smoke run on the CPU

For SD1.5 and SDXL layer shapes (batch 2, as under classifier-free guidance) at 512 to 4096 px (and 8192
where memory allows), it first checks every kernel against the PyTorch path, then times (median of
CUDA-event-timed repeats): the depthwise convolution (ours and PyTorch's channels-last conv2d), our
fused conv+gate, pooling and gate+upsample kernels, the whole ΔConvBlock on each backend, SDPA
self-attention (flash backend) and LinFusion attention. Each kernel's achieved bandwidth (bytes it must
move / time) is reported next to the card's copy bandwidth, measured here with a device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from deltaconv_cli import kernels  # noqa: F401 - registers the torch.ops.deltaconv kernels
from deltaconv_cli.block import DeltaConvBlock
from deltaconv_cli.linfusion import LinFusionAttention

# (model, stage, channels, heads, kernel size, latent stride) of the first stage with attention.
SHAPES = [("sd15", "down_blocks.0", 320, 8, 7, 1), ("sdxl", "down_blocks.1", 640, 10, 9, 2)]


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = 256 * 2**20 if device.type == "cuda" else 2**20
    src = torch.empty(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def check(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Largest absolute differences between the Triton and PyTorch paths on odd, non-square shapes."""
    ops = torch.ops.deltaconv
    torch.manual_seed(0)
    results = {}
    for k in (3, 7, 13):
        x = torch.randn(2, 33, 21, 64, device=device, dtype=dtype)
        w = torch.randn(64, 1, k, k, device=device, dtype=dtype)
        b = torch.randn(64, device=device, dtype=dtype)
        ref = F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=k // 2, groups=64).permute(0, 2, 3, 1)
        results[f"dwconv k={k}"] = (ops.dwconv2d(x, w, b) - ref).abs().max().item()
    block_t = DeltaConvBlock(64, 9, backend="torch").to(device, dtype)
    block_k = DeltaConvBlock(64, 9, backend="triton").to(device, dtype)
    block_k.load_state_dict(block_t.state_dict())
    x = torch.randn(2, 31, 47, 64, device=device, dtype=dtype)
    with torch.no_grad():
        results["block (inference, fused gate)"] = (block_k(x) - block_t(x)).abs().max().item()
    return results


def kernel_rows(u: torch.Tensor, k: int, repeats: int, bandwidth: float) -> dict[str, dict[str, float]]:
    """Time each kernel on a (B, H, W, C') grid; bandwidth from the bytes each must move at least once."""
    ops = torch.ops.deltaconv
    batch, h, w, inner = u.shape
    weight = torch.randn(inner, 1, k, k, device=u.device, dtype=u.dtype)
    bias = torch.randn(inner, device=u.device, dtype=u.dtype)
    half = u[:, : h // 2, : w // 2].contiguous()
    grid_bytes = u.numel() * u.element_size()
    cases = {  # name: (call, bytes read + written)
        "dwconv_triton": (partial(ops.dwconv2d, u, weight, bias), 2 * grid_bytes),
        "dwconv_torch": (
            partial(F.conv2d, u.permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=inner),
            2 * grid_bytes,
        ),
        "dwconv_gate_triton": (partial(ops.dwconv2d_gate, u, weight, bias, 0, 1.0), 1.5 * grid_bytes),
        "avg_pool_triton": (partial(ops.avg_pool, u, h // 2, w // 2), 1.25 * grid_bytes),
        "gate_upsample_triton": (partial(ops.gate_upsample, half, h, w, 0, 1.0), 0.75 * grid_bytes),
    }
    rows = {}
    for name, (call, traffic) in cases.items():
        ms = timed(call, repeats, u.device)
        rate = traffic / (ms / 1e3)
        rows[name] = {"ms": ms, "gb_s": rate / 1e9, "of_copy_bandwidth": rate / bandwidth}
    return rows


def mixer_rows(x: torch.Tensor, heads: int, k: int, repeats: int) -> dict[str, dict[str, float | str]]:
    """Whole ΔConvBlock on both backends, LinFusion attention and SDPA self-attention (flash on CUDA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, h, w, channels = x.shape
    rows: dict[str, dict[str, float | str]] = {}
    with torch.no_grad():
        for backend in ("triton", "torch"):
            block = DeltaConvBlock(channels, k, backend=backend).to(x.device, x.dtype)
            rows[f"block_{backend}"] = {"ms": timed(partial(block, x), repeats, x.device)}
        linfusion = LinFusionAttention(channels, heads, channels // heads).to(x.device, x.dtype)
        rows["linfusion"] = {"ms": timed(partial(linfusion, x), repeats, x.device)}
        if h * w <= 256 * 256:  # beyond this one attention call takes minutes
            q = torch.randn(batch, heads, h * w, channels // heads, device=x.device, dtype=x.dtype)
            flash = SDPBackend.FLASH_ATTENTION if x.is_cuda else SDPBackend.MATH
            with sdpa_kernel(flash):
                rows["sdpa"] = {
                    "ms": timed(partial(F.scaled_dot_product_attention, q, q, q), repeats, x.device)
                }
        else:
            rows["sdpa"] = {"skipped": f"{h * w} tokens: the quadratic cost is too large to time"}
    return rows


def run(device: torch.device, dtype: torch.dtype, resolutions: list[int], repeats: int) -> dict:
    bandwidth = copy_bandwidth(device, dtype, repeats)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "checks": check(device, dtype),
        "rows": [],
    }
    for model, stage, channels, heads, k, stride in SHAPES:
        for px in resolutions:
            h = w = px // 8 // stride
            row = {"model": model, "stage": stage, "px": px, "grid": [h, w], "channels": channels, "k": k}
            try:
                u = torch.randn(2, h, w, channels // 2, device=device, dtype=dtype)
                row.update(kernel_rows(u, k, repeats, bandwidth))
                del u
                row.update(
                    mixer_rows(torch.randn(2, h, w, channels, device=device, dtype=dtype), heads, k, repeats)
                )
                block = row["block_triton"]["ms"]
                row["ratios"] = {
                    "block_torch_over_triton": row["block_torch"]["ms"] / block,
                    "linfusion_over_block": row["linfusion"]["ms"] / block,
                    "attention_over_block": row["sdpa"].get("ms", float("nan")) / block,
                }
            except torch.OutOfMemoryError:
                row["skipped"] = "out of memory"
                torch.cuda.empty_cache()
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes (a smoke test, e.g. in the interpreter)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/triton-kernels.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    resolutions = [64] if args.quick else [512, 1024, 2048, 4096, 8192]
    report = run(device, getattr(torch, args.dtype), resolutions, 2 if args.quick else args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"checks: {report['checks']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
