"""Which path a ΔConvBlock's local branch runs (Triton kernels or PyTorch), and the kernels' self-check.

The Triton kernels are chosen automatically on CUDA, where no test of this project has run them. So the
first time they run in a process for a device, a dtype (input and weights) and a kind of call (gate, a
pooled branch or not, with or without gradients), they are compared with the PyTorch path on a small crop of
the real input: forward, and backward when gradients are needed, within a tolerance stated per dtype. On an
exception or a disagreement the block warns once and runs PyTorch from then on; with
``DELTACONV_BACKEND=triton`` (or ``backend="triton"``) the failure is an error instead. The result is
cached per process; :func:`self_check_results` lists it (``deltaconv env`` prints it).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .errors import first_line

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "DELTACONV_BACKEND"  # forces "torch" or "triton" for every block left at "auto"
CHECK_CROP = 8  # the self-check runs on at most this many rows and columns of one sample
# The largest difference allowed between the Triton path and PyTorch's, per input dtype, as a share of the
# larger of 1 and PyTorch's largest absolute value: fp16 and bf16 keep 11 and 8 bits of mantissa, and the
# two paths round in different places (the kernels accumulate in float32).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
REPORT_HINT = "please report it with the output of `deltaconv env` (README: Reporting a bug)"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend(block_backend: str) -> str:
    """The backend asked for: the block's own, or for ``"auto"`` the ``DELTACONV_BACKEND`` variable."""
    choice = block_backend if block_backend != "auto" else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "triton" and not triton_available():
        raise RuntimeError("the Triton backend was asked for, but triton is not installed")
    return choice


@dataclass(frozen=True)
class CheckResult:
    """One self-check: what ran, and whether the Triton path agreed with PyTorch's."""

    key: str  # device, dtypes and kind of call
    passed: bool
    detail: str  # the largest difference against its tolerance, or the exception


_RESULTS: dict[tuple, CheckResult] = {}


def self_check_results() -> list[CheckResult]:
    """Every self-check this process ran, in order."""
    return list(_RESULTS.values())


def clear_self_checks() -> None:
    """Forget the cached results (tests; a process normally checks once)."""
    _RESULTS.clear()


def auto_chooses_triton(x: torch.Tensor) -> bool:
    """What ``"auto"`` picks for ``x`` before the self-check: the kernels on CUDA when Triton is installed."""
    return x.is_cuda and triton_available()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def uses_triton(block: Any, x: torch.Tensor) -> bool:
    """Whether ``block`` runs its local branch on ``x`` with the Triton kernels: asked for (or chosen for
    CUDA), and the self-check for this kind of call passed."""
    choice = requested_backend(block.backend)
    if choice == "torch" or (choice == "auto" and not auto_chooses_triton(x)):
        return False
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return True  # traced, not run: the check runs on the first real call
    key = _call_kind(block, x)
    result = _RESULTS.get(key)
    if result is None:
        result = _RESULTS[key] = _run_check(block, x, key)
        if not result.passed and choice != "triton":
            warnings.warn(
                f"deltaconv's Triton kernels failed their self-check ({result.key}): {result.detail}; the "
                f"blocks use PyTorch instead. {REPORT_HINT}",
                RuntimeWarning,
                stacklevel=4,
            )
    if not result.passed and choice == "triton":
        raise RuntimeError(
            f"deltaconv's Triton kernels failed their self-check ({result.key}): {result.detail}; "
            f"{BACKEND_ENV}=triton (or backend='triton') makes that an error"
        )
    return result.passed


def _call_kind(block: Any, x: torch.Tensor) -> tuple:
    """What a self-check result holds for: device, input, weight and autocast dtypes, gate, whether a pooled
    branch runs, and whether gradients are needed."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or block.proj_in.weight.requires_grad or block.convs[0].weight.requires_grad
    )
    pooled = any(scale != 1.0 for scale in block.scales)
    autocast = _autocast_dtype(x.device.type)
    return (str(x.device), x.dtype, block.convs[0].weight.dtype, autocast, block.gate, pooled, needs_grad)


def _describe(key: tuple) -> str:
    device, x_dtype, w_dtype, autocast, gate, pooled, needs_grad = key
    dtypes = f"input {_name(x_dtype)}, weights {_name(w_dtype)}"
    if autocast is not None:
        dtypes += f", {_name(autocast)} autocast"
    branches = "with a pooled branch" if pooled else "no pooled branch"
    return f"{device}, {dtypes}, gate {gate}, {branches}, {'training' if needs_grad else 'inference'}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run_check(block: Any, x: torch.Tensor, key: tuple) -> CheckResult:
    """Compare the two paths on a crop of ``x`` (forward, and the input and kernel gradients if needed)."""
    described, needs_grad = _describe(key), key[-1]
    crop = x.detach()[:1, :CHECK_CROP, :CHECK_CROP].contiguous().requires_grad_(needs_grad)
    weights = [conv.weight for conv in block.convs]
    tolerance = TOLERANCES.get(key[3] or x.dtype, TOLERANCES[torch.float32])
    try:
        with torch.enable_grad() if needs_grad else torch.no_grad():
            expected = block._local_torch(crop)
            got = block._local_triton(crop)
            pairs = [("output", got, expected)]
            if needs_grad:
                upstream = torch.randn_like(expected)
                inputs = [crop, *(w for w in weights if w.requires_grad)]
                expected_grads = torch.autograd.grad(expected, inputs, upstream, allow_unused=True)
                got_grads = torch.autograd.grad(got, inputs, upstream, allow_unused=True)
                names = ["input gradient", *(f"kernel {i} gradient" for i in range(len(inputs) - 1))]
                pairs += list(zip(names, got_grads, expected_grads, strict=True))
    except Exception as err:  # any failure of the kernels (compilation, launch, a wrong shape) counts
        return CheckResult(described, False, f"{type(err).__name__}: {first_line(err, 300)}")
    worst = ""
    for name, a, b in pairs:
        if a is None or b is None:
            continue
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape:
            return CheckResult(
                described, False, f"{name} has shape {list(a.shape)}, PyTorch's {list(b.shape)}"
            )
        error = float((a - b).abs().max())
        limit = tolerance * max(1.0, float(b.abs().max()))
        if not error <= limit:  # also catches NaN
            return CheckResult(described, False, f"{name} differs by {error:.3g} (tolerance {limit:.3g})")
        worst = worst or f"largest difference {error:.2g} within {limit:.2g}"
    return CheckResult(described, True, worst or "agrees")


def check_kernels(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> list[CheckResult]:
    """Run the self-check on a small block for each dtype: inference with weights in that dtype, and, for
    half dtypes, training under autocast with float32 weights (how a pipeline in that dtype and a
    mixed-precision run call the kernels). Failures are returned, not raised or warned about."""
    from .block import DeltaConvBlock

    generator = torch.Generator().manual_seed(0)
    results = []
    for dtype in dtypes:
        block = DeltaConvBlock(16, 3, scales=(1.0, 0.5), backend="triton")
        x = torch.randn(1, 9, 7, 16, generator=generator)
        cases = [(block.to(device, dtype).requires_grad_(False), x.to(device, dtype), None)]
        if dtype in (torch.float16, torch.bfloat16):
            trained = DeltaConvBlock(16, 3, scales=(1.0, 0.5), backend="triton").to(device)
            cases.append((trained, x.to(device), dtype))
        for case, inputs, autocast in cases:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                key = _call_kind(case, inputs)
                _RESULTS[key] = _run_check(case, inputs, key)
                results.append(_RESULTS[key])
    return results
