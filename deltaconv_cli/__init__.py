"""deltaconv: replace self-attention in diffusers models with distilled ΔConvBlocks.

The public API is imported lazily so that ``deltaconv --help`` does not pay for importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "DeltaConvBlock": "block",
    "DeltaConvAdapter": "surgery",
    "find_self_attention_sites": "surgery",
    "mounted_adapter": "surgery",
    "trace_token_grids": "surgery",
    "load_converted": "loading",
    "load_adapter": "loading",
    "convert": "convert",
    "read_weights": "interop",
    "export_adapter": "interop",
    "inspect_weights": "inspection",
    "DeltaConvError": "errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'deltaconv_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
