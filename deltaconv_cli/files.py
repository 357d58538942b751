"""Writing results so that a crash never leaves a half-written folder: one atomic write, and an optimizer's
state as safetensors (no pickle) plus JSON."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """A fresh path next to ``out`` to write a file or folder into. When the block ends without an error it
    takes ``out``'s place (an old ``out`` is moved aside first and put back if the rename fails); on an error
    or an interrupt it is removed and ``out`` stays as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = out.parent / f".{out.name}.tmp-{tag}"
    retired = out.parent / f".{out.name}.old-{tag}"
    try:
        yield staging
        if out.exists():
            out.rename(retired)
        staging.rename(out)
    except BaseException:
        _remove(staging)
        if retired.exists() and not out.exists():
            retired.rename(out)
        raise
    _remove(retired)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def optimizer_tensors(optimizer: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's per-parameter state as flat tensors (``{prefix}{index}.{name}``) and its param groups
    (JSON): what a checkpoint stores instead of a pickle."""
    state = optimizer.state_dict()
    tensors = {f"{prefix}{index}.{name}": value.detach().cpu().contiguous()
               for index, entry in state["state"].items() for name, value in entry.items()}  # fmt: skip
    return tensors, state["param_groups"]


def load_optimizer_tensors(
    optimizer: Any, tensors: dict[str, torch.Tensor], param_groups: list[dict], prefix: str = ""
) -> None:
    """Restore what :func:`optimizer_tensors` took (other keys of ``tensors`` are passed over)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key.removeprefix(prefix).split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
