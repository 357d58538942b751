"""``deltaconv env``: what a bug report needs to know about this machine (like ``diffusers-cli env`` and
``accelerate env``): versions, devices with their memory, which path the blocks take and whether the
Triton kernels pass their self-check for each dtype, and the SDPA backends. Works offline."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import psutil
import torch

from .backend import BACKEND_ENV, auto_chooses_triton, check_kernels, requested_backend, triton_available

PACKAGES = ("deltaconv", "torch", "diffusers", "transformers", "accelerate", "triton", "safetensors",
            "huggingface-hub", "numpy")  # fmt: skip
CHECK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[dict[str, Any]]:
    memory = psutil.virtual_memory()
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "memory_gib": round(memory.total / 2**30, 1)}]  # fmt: skip
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"device": f"cuda:{index}", "name": props.name,
                        "memory_gib": round(props.total_memory / 2**30, 1),
                        "capability": f"{props.major}.{props.minor}"})  # fmt: skip
    return devices


def _sdpa_backends() -> dict[str, str]:
    """Which of PyTorch's scaled-dot-product-attention kernels are enabled (and, where PyTorch can say,
    usable on this build): what the original self-attention runs on."""
    cuda = torch.backends.cuda
    backends = {}
    for name, enabled, available in (
        ("flash", "flash_sdp_enabled", "is_flash_attention_available"),
        ("memory-efficient", "mem_efficient_sdp_enabled", None),
        ("cudnn", "cudnn_sdp_enabled", None),
        ("math", "math_sdp_enabled", None),
    ):
        if not hasattr(cuda, enabled):
            continue
        state = "enabled" if getattr(cuda, enabled)() else "disabled"
        if available and hasattr(cuda, available) and not getattr(cuda, available)():
            state += ", not built into this torch"
        backends[name] = state
    return backends


def collect_environment() -> dict[str, Any]:
    """Everything ``deltaconv env`` reports, as JSON-ready data."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = torch.empty(0, device=device)
    try:
        requested = requested_backend("auto")
        problem = None
    except (ValueError, RuntimeError) as err:
        requested, problem = os.environ.get(BACKEND_ENV, "auto"), str(err)
    triton = problem is None and (
        requested == "triton" or (requested == "auto" and auto_chooses_triton(probe))
    )
    blocks = {
        "requested": requested,
        "variable": os.environ.get(BACKEND_ENV),
        "device": str(device),
        "path": "triton (after its self-check)" if triton else "torch",
        "problem": problem,
        "triton_available": triton_available(),
    }
    if triton:
        checks = [{"check": r.key, "passed": r.passed, "detail": r.detail}
                  for r in check_kernels(device, CHECK_DTYPES)]  # fmt: skip
    else:
        checks = []
        blocks["self_check"] = f"not run: the blocks use PyTorch on {device}"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {package: _version(package) for package in PACKAGES},
        "cuda": torch.version.cuda,
        "devices": _devices(),
        "blocks": blocks,
        "self_checks": checks,
        "sdpa": _sdpa_backends(),
    }
