"""Small helpers every command shares: devices and dtypes by name, the checks of an output folder and of
seeds, reading a user's text file, parameter counts, human-readable units, and the interleaved timer
(timing in turns, medians) that ``profile`` and ``eval`` use."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import DeltaConvError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (float32, float16 or bfloat16)."""
    if name not in DTYPES:
        raise DeltaConvError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def checked_device(name: str) -> torch.device:
    """The device called ``name``; a clear error for a CUDA device this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeltaConvError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeltaConvError(f"--device {name} asked for, but no CUDA device is available")
    return device


def check_output_folder(out: Path) -> None:
    """A clear error, before any work, where ``out`` cannot become a folder: it is a file, a path through a
    file, or under a folder this process may not write to."""
    if out.exists() and not out.is_dir():
        raise DeltaConvError(f"{out} exists and is not a folder")
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        raise DeltaConvError(f"{out} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DeltaConvError(f"{out} cannot be written: {existing} is not writable")


def check_seeds(seeds: Sequence[int]) -> None:
    """Seeds as torch's generators take them: a negative seed would stand for a large one (-1 for
    2**64 - 1), and one from 2**64 on would fail only once the model is loaded."""
    if not seeds:
        raise DeltaConvError("no seeds given")
    if min(seeds) < 0:
        raise DeltaConvError(f"seed must be >= 0, got {min(seeds)}")
    if max(seeds) >= 2**64:
        raise DeltaConvError(f"seeds must be below 2**64, got {max(seeds)}")


def read_text_file(path: Path) -> str:
    """The UTF-8 text of a file the user named; one clear line where it cannot be read as such."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DeltaConvError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise DeltaConvError(f"cannot read {path}: {err.strerror or err}") from None


def numel(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode that are alive at once (views and in-place
    results share memory and are not counted again)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    nbytes = tensor.numel() * tensor.element_size()
                    self.live += nbytes
                    weakref.finalize(tensor, self._release, nbytes)
            self.peak = max(self.peak, self.live)
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of the work done inside the ``with``: on CUDA the allocator's peak above what was
    allocated on entry; on the CPU the process's peak resident size as the OS reports it (weights,
    libraries and everything since the process started: an upper bound)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.what = "CUDA allocator, above the loaded model" if device.type == "cuda" else "process peak RSS"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


class Timer:
    """Latency of callables on one device: warm-up, then the median of synchronised repeats."""

    def __init__(self, device: torch.device, dtype: torch.dtype, repeats: int, budget_s: float) -> None:
        self.device, self.dtype, self.repeats, self.budget_s = device, dtype, repeats, budget_s
        self.macs_per_s = self._calibrate()

    def _calibrate(self) -> float:
        a = torch.randn(1024, 1024, device=self.device, dtype=self.dtype)
        times = []
        for _ in range(4):
            synchronize(self.device)
            start = time.perf_counter()
            a @ a
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        return 1024**3 / min(times[1:])

    def skip_reason(self, macs: int, needed_bytes: int) -> str | None:
        free = free_bytes(self.device)
        if needed_bytes > 0.8 * free:
            return f"needs {needed_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        estimate = macs / self.macs_per_s * (self.repeats + 1)
        if estimate > self.budget_s:
            return f"estimated {estimate:.0f} s > time budget {self.budget_s:.0f} s"
        return None

    def latency_ms(self, run: Callable[[], Any]) -> float:
        return self.interleaved_latency_ms(run, {"run": contextlib.nullcontext})["run"]

    def interleaved_latency_ms(
        self, run: Callable[[], Any], setups: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]]
    ) -> dict[str, float]:
        """Median latency of ``run`` under each setup, timed in turns (one of each per round, the setup
        itself untimed) so that drift of the machine weighs on all of them alike, not on the last one."""
        times: dict[str, list[float]] = {name: [] for name in setups}
        with torch.no_grad():
            for rounds in (1, self.repeats):  # the first round is the warm-up
                for _ in range(rounds):
                    for name, setup in setups.items():
                        with setup():
                            synchronize(self.device)
                            start = time.perf_counter()
                            run()
                            synchronize(self.device)
                            times[name].append(time.perf_counter() - start)
        return {name: statistics.median(values[1:]) * 1e3 for name, values in times.items()}

    @property
    def peak_kind(self) -> str:
        """What :meth:`peak_bytes` counts on this device."""
        if self.device.type == "cuda":
            return "CUDA allocator peak above the loaded model"
        return "peak of tensors alive at once, above the loaded model"

    def peak_bytes(self, run: Callable[[], Any]) -> int:
        """Peak memory of one call beyond what was allocated before it (CUDA allocator; on the CPU,
        tracked from tensor allocations)."""
        with torch.no_grad():
            if self.device.type == "cuda":
                synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
                run()
                synchronize(self.device)
                return torch.cuda.max_memory_allocated(self.device) - base
            tracker = LiveBytes()
            with tracker:
                run()
            return tracker.peak
