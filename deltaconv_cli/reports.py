"""Rendering of the reports a command prints: each table is built from (heading, cell) pairs, so its
headings and its cells cannot drift apart. The CLI prints what these return."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.table import Table

from .profile import MIXERS, ProfileReport, human_bytes, human_count

MIXER_LABELS = {"attention": "attn", "deltaconv": "ΔConv", "linfusion": "LinFusion"}
Column = tuple[str, Callable[[Any], str]]


def table(title: str, columns: Sequence[Column], rows: Sequence[Any], left: int = 1) -> Table:
    """A table with one column per (heading, cell function) pair; the first ``left`` are left-aligned."""
    result = Table(title=title)
    for index, (heading, _) in enumerate(columns):
        result.add_column(heading, justify="left" if index < left else "right")
    for row in rows:
        result.add_row(*(cell(row) for _, cell in columns))
    return result


def _per_mixer(group: str, value: Callable[[Any, str], str]) -> list[Column]:
    """One column per mixer under a group heading: "group attn", "ΔConv", "LinFusion"."""
    return [
        (f"{group} {MIXER_LABELS[m]}" if i == 0 else MIXER_LABELS[m], lambda row, m=m: value(row, m))
        for i, m in enumerate(MIXERS)
    ]


def _area(grid: tuple[int, int]) -> int:
    return grid[0] * grid[1]


def _measured(value: float | None, spec: str) -> str:
    return "skipped" if value is None else format(value, spec)


def profile_tables(report: ProfileReport, measured: bool) -> list[Table]:
    """The summary (multiply-adds per image across resolutions) and one per-layer-shape table per
    resolution, with the measured columns when ``measured``."""
    summary: list[Column] = [
        ("resolution", lambda r: f"{r.height}x{r.width}"),
        (
            "top grid",
            lambda r: "x".join(map(str, max((la.grid for la in r.layers), key=lambda g: g[0] * g[1]))),
        ),
        *_per_mixer("MACs", lambda r, m: human_count(r.total(m))),
        ("attn/ΔConv", lambda r: f"{r.attention_over_deltaconv:,.1f}x"),
        ("LinFusion/ΔConv", lambda r: f"{r.linfusion_over_deltaconv:.2f}x"),
        ("attn share of denoiser", lambda r: f"{r.attention_share:.1%}"),
    ]
    if measured:
        summary += _per_mixer("step ms", lambda r, m: _measured(r.step_latency_ms.get(m), ",.0f"))
    title = f"{report.model} ({report.denoiser_class}): multiply-adds per image, all self-attention sites"
    tables = [table(title, summary, report.resolutions, left=2)]

    per_shape: list[Column] = [
        ("stage", lambda s: s[0].stage),
        ("grid", lambda s: f"{s[0].grid[0]}x{s[0].grid[1]}"),
        ("C", lambda s: str(s[0].channels)),
        ("k", lambda s: str(s[0].kernel_size)),
        ("n", lambda s: str(len(s))),
        *_per_mixer("MACs", lambda s, m: human_count(getattr(s[0], m).macs)),
        *_per_mixer("params", lambda s, m: human_count(getattr(s[0], m).params)),
        *_per_mixer("act.", lambda s, m: human_bytes(getattr(s[0], m).activation_bytes)),
    ]
    if measured:
        per_shape += _per_mixer("ms", lambda s, m: _measured(getattr(s[0], m).latency_ms, ",.2f"))
    for r in report.resolutions:
        shapes: dict[tuple, list] = {}
        for layer in r.layers:
            shapes.setdefault((layer.stage, layer.grid, layer.channels, layer.kernel_size), []).append(layer)
        title = f"{r.height}x{r.width}: per layer shape (n = layers of that shape)"
        tables.append(table(title, per_shape, list(shapes.values())))
    return tables


def profile_notes(report: ProfileReport) -> list[str]:
    """What was skipped and why, and where attention/ΔConv passes the paper's ratio."""
    notes = []
    for r in report.resolutions:
        skipped = {
            f"{m} {layer.grid[0]}x{layer.grid[1]}x{layer.channels}": getattr(layer, m).skipped
            for layer in r.layers
            for m in MIXERS
            if getattr(layer, m).skipped
        }
        skipped.update({f"{m} step": why for m, why in r.step_skipped.items()})
        notes += [f"{r.height}x{r.width}: skipped {what}: {why}" for what, why in skipped.items()]
    if report.paper_ratio_passed_at:
        notes.append(
            f"attention/ΔConv passes the paper's {report.paper_ratio:,}x at "
            f"{report.paper_ratio_passed_at:,} px square ({report.ratio_at_crossing:,.0f}x there)."
        )
    else:
        notes.append(f"attention/ΔConv does not reach the paper's {report.paper_ratio:,}x below 65,536 px.")
    return notes
