"""``deltaconv inspect``: what a weights file or folder holds, read from safetensors headers alone.

A user holding a released file sees, before converting with it, the layout it is recognised as (format,
family, blocks, channels, kernel sizes, gates, dtypes, key nesting), the tensors outside any block grouped
by module with their counts and sizes, and what ``convert --weights`` would do with each group. No tensor
data is read, so a multi-GB file is inspected at once.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from .errors import DeltaConvError
from .interop import (
    CONVFUSION_KEY,
    CONVFUSION_PARTS,
    EMA_COPY,
    MODEL_COPY,
    NESTING_SEPARATOR,
    convfusion_base_model,
    convfusion_scales,
    key_groups,
    linfusion_modules,
    locate_weights,
    safetensors_header,
    weights_format,
)
from .loading import ADAPTER_DIR, read_json_object

# Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
_INDEX = re.compile(r"^\d+$")


@dataclass
class TensorGroup:
    """Tensors of one kind of module (indices starred), e.g. ``up_blocks.*.resnets``."""

    module: str
    tensors: int
    bytes: int
    action: str  # what ``convert --weights`` does with them


@dataclass
class WeightsInspection:
    source: str
    format: str  # one of interop.FORMATS
    family: str | None  # where it can be told from the keys or the config
    blocks: int
    channels: list[int]
    kernel_sizes: list[int] = field(default_factory=list)
    gates: int | None = None  # ConvFusion: gates (scales) per block
    scales: list[float] | None = None  # where known: recorded, or the authors' two
    mixer: str | None = None
    projection_mid_dims: list[int | None] | None = None  # LinFusion: the distinct widths
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensors
    key_nesting: list[str] = field(default_factory=list)  # ConvFusion: [] flat, else base / base_ema
    tensors: int = 0
    bytes: int = 0
    groups: list[TensorGroup] = field(default_factory=list)
    base_model: str | None = None
    notes: list[str] = field(default_factory=list)  # what convert needs to be told, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(entry: tuple[str, list[int]]) -> int:
    dtype, shape = entry
    count = 1
    for side in shape:
        count *= side
    return count * DTYPE_BYTES.get(dtype, 4)


def module_group(key: str) -> str:
    """The kind of module a tensor belongs to, indices starred: ``up_blocks.*.resnets`` for
    ``up_blocks.1.resnets.0.conv1.weight``; inside transformer blocks down to the sub-module
    (``...transformer_blocks.*.attn2``); a module without indices by its first name (``conv_in``)."""
    parts = ["*" if _INDEX.match(part) else part for part in key.split(".")[:-1]]
    if "*" not in parts:
        return parts[0] if parts else key
    if "transformer_blocks" in parts:
        end = parts.index("transformer_blocks") + 3  # transformer_blocks, *, its sub-module
        return ".".join(parts[:end])
    named = [i for i, part in enumerate(parts) if part != "*"]
    return ".".join(parts[: named[min(1, len(named) - 1)] + 1])


def _family_from_sites(sites: list[str]) -> str | None:
    """The denoiser family whose self-attention stands at ``sites`` (``<...>.attn1``), from their names."""
    if not sites:
        return None
    if all(site.startswith("transformer_blocks.") for site in sites):
        return "pixart"
    if any(site.startswith("down_blocks.0.attentions.") for site in sites):
        return "sd"  # SD 1.x/2.x attend at the full-resolution level, SDXL does not
    return "sdxl"


def _add_groups(report: WeightsInspection, header: dict[str, tuple[str, list[int]]], action: Any) -> None:
    totals: dict[str, list[int]] = {}
    for key, entry in header.items():
        group = totals.setdefault(module_group(key), [0, 0])
        group[0] += 1
        group[1] += _size(entry)
    report.groups += [TensorGroup(name, count, size, action(name)) for name, (count, size) in totals.items()]


def _inspect_convfusion(path: Path) -> WeightsInspection:
    header, metadata = safetensors_header(path)
    groups = key_groups(list(header), path.name)
    read = MODEL_COPY if MODEL_COPY in groups else (EMA_COPY if groups else None)
    prefix = "" if read is None else read + NESTING_SEPARATOR
    model = {key.removeprefix(prefix): entry for key, entry in header.items() if key.startswith(prefix)}
    blocks: dict[str, dict[str, tuple[str, list[int]]]] = {}
    others: dict[str, tuple[str, list[int]]] = {}
    for key, entry in model.items():
        match = CONVFUSION_KEY.match(key)
        if match is not None and CONVFUSION_PARTS.match(match["rest"]):
            blocks.setdefault(match["site"], {})[match["rest"]] = entry
        else:
            others[key] = entry
    sites = [f"{site}.attn1" for site in blocks]
    family = _family_from_sites(sites)
    gate_counts = {
        sum(1 for name in parts if name.endswith("conv_spatial.weight")) for parts in blocks.values()
    }
    report = WeightsInspection(
        source=str(path),
        format="convfusion",
        family=family,
        blocks=len(blocks),
        channels=sorted({p["conv_up.weight"][1][1] for p in blocks.values() if "conv_up.weight" in p}),
        kernel_sizes=sorted(
            {
                p["gates.0.conv_spatial.weight"][1][0]
                for p in blocks.values()
                if "gates.0.conv_spatial.weight" in p
            }
        ),
        gates=next(iter(gate_counts)) if len(gate_counts) == 1 else None,
        dtypes=dict(Counter(dtype for dtype, _ in header.values())),
        key_nesting=groups,
        tensors=len(header),
        bytes=sum(_size(entry) for entry in header.values()),
    )
    if family is not None:
        report.base_model, note = convfusion_base_model(metadata, family, path.name)
        if report.base_model is None and note:  # the pixart1024 students: their configs disagree
            report.notes.append(note)
    if report.gates == 0:
        report.notes.append("its blocks have no gates (gates.{i}.conv_spatial.weight): convert refuses them")
    elif report.gates is not None:
        try:  # the rule convert follows, and its one line where the file does not say
            report.scales = list(convfusion_scales(path.name, report.gates, None, metadata)[0])
        except DeltaConvError as err:
            report.notes.append(str(err))
    if len(gate_counts) > 1:
        report.notes.append("its blocks differ in their number of gates: convert refuses such a file")
    if groups and read == EMA_COPY:
        report.notes.append("it holds only an EMA copy (base_ema:): convert reads it with --ema")
    elif EMA_COPY in groups:
        report.notes.append("convert reads the model's copy (base:); --ema reads the EMA copy (base_ema:)")

    attention = tuple(f"{site}." for site in sites)
    block_header = {key: entry for key, entry in model.items() if key not in others}
    read_as = f"read as {report.blocks} ΔConv blocks where the self-attention (attn1) was"
    _add_groups(
        report, {f"{prefix}{key}": entry for key, entry in block_header.items()}, lambda name: read_as
    )

    def other_action(name: str) -> str:
        if any(key.startswith(attention) for key in others if module_group(key) == name.removeprefix(prefix)):
            return "refused by convert: the student has no self-attention where its blocks stand"
        return "replace MODEL's tensors of these names (convert checks their shapes)"

    _add_groups(report, {f"{prefix}{key}": entry for key, entry in others.items()}, other_action)
    if read is not None and len(groups) == 2:
        unread = [entry for key, entry in header.items() if not key.startswith(prefix)]
        action = "not read: the EMA copy (--ema reads it instead of base:)"
        report.groups.append(TensorGroup(f"{EMA_COPY}:*", len(unread), sum(map(_size, unread)), action))
    return report


def _inspect_linfusion(path: Path) -> WeightsInspection:
    modules = linfusion_modules(path)
    weights = path / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        raise DeltaConvError(f"LinFusion folder {path} has no {SAFETENSORS_WEIGHTS_NAME}")
    header, _ = safetensors_header(weights)
    report = WeightsInspection(
        source=str(path),
        format="linfusion",
        family=_family_from_sites([m.get("module_name", "") for m in modules]),
        blocks=len(modules),
        channels=sorted({m["dim_n"] for m in modules}),
        mixer="linfusion",
        projection_mid_dims=sorted(
            {m.get("projection_mid_dim") for m in modules}, key=lambda w: (w is None, w)
        ),
        dtypes=dict(Counter(dtype for dtype, _ in header.values())),
        tensors=len(header),
        bytes=sum(_size(entry) for entry in header.values()),
    )
    _add_groups(report, {key.split(".", 1)[1]: entry for key, entry in header.items()},
                lambda name: f"read into the LinFusion block of each of {len(modules)} modules")  # fmt: skip
    return report


def _inspect_adapter(path: Path) -> WeightsInspection:
    config = read_json_object(path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    header = {}
    for file in files:
        header.update(safetensors_header(file)[0])
    report = WeightsInspection(
        source=str(path),
        format="deltaconv",
        family=config.get("family"),
        blocks=len(config.get("targets", [])),
        channels=sorted(set(config.get("channels", []))),
        kernel_sizes=sorted(set(config.get("kernel_sizes") or [])),
        scales=list(config.get("scales", [])) if config.get("mixer", "deltaconv") == "deltaconv" else None,
        mixer=config.get("mixer", "deltaconv"),
        projection_mid_dims=sorted(set(config["projection_mid_dims"]))
        if config.get("projection_mid_dims")
        else None,  # fmt: skip
        dtypes=dict(Counter(dtype for dtype, _ in header.values())),
        tensors=len(header),
        bytes=sum(_size(entry) for entry in header.values()),
        base_model=config.get("base_model_name_or_path"),
    )
    _add_groups(report, {key.removeprefix("blocks."): entry for key, entry in header.items()},
                lambda name: "read as they are (a deltaconv adapter)")  # fmt: skip
    return report


def inspect_weights(source: str | Path) -> WeightsInspection:
    """What ``source`` holds (any layout ``convert --weights`` reads, or a converted model folder), from
    its safetensors headers and configs only."""
    path = locate_weights(source)
    if path.is_dir() and (path / ADAPTER_DIR / "config.json").is_file():
        path = path / ADAPTER_DIR  # a converted model folder: its adapter
    kind = weights_format(path)
    if kind == "convfusion":
        return _inspect_convfusion(path)
    if kind == "linfusion":
        return _inspect_linfusion(path)
    return _inspect_adapter(path)
