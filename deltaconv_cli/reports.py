"""How each command's report reads on screen: tables and lines built from the report objects the
library returns (the CLI prints them). Every table is built from (heading, cell) pairs, so its headings
and its cells cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.table import Table

from .mixers import MIXERS as MIXER_KINDS
from .profile import MIXERS, ProfileReport
from .runtime import human_bytes, human_count

MIXER_LABELS = {"attention": "attn", **{name: kind.label for name, kind in MIXER_KINDS.items()}}
Column = tuple[str, Callable[[Any], str]]
Rendered = list[RenderableType]  # tables and lines, printed in order


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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


def profile_report(report: ProfileReport, measured: bool) -> Rendered:
    """``profile``: the tables, then what was skipped and where the paper's ratio is passed."""
    return [*profile_tables(report, measured), *profile_notes(report)]


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


def end_to_end_report(report: Any) -> Rendered:
    """``profile --end-to-end``: seconds per image and peak memory per system and size, then the
    crossover sizes, how the blocks were made and what was skipped."""
    from .profile import SYSTEMS

    labels = {"original": "original", **{name: kind.label for name, kind in MIXER_KINDS.items()}}

    def size_cell(s: Any) -> str:
        return f"{s.height}x{s.width}" + (" (tiled VAE)" if s.vae_tiling else "")

    columns: list[Column] = [("size", size_cell)]
    columns += [(f"s / image {labels[n]}", lambda s, n=n: _measured(s.systems[n].seconds_per_image, ".3f"))
                for n in SYSTEMS]  # fmt: skip
    columns += [(f"speed-up {labels[n]}", lambda s, n=n: _number(s.speedup(n), ".2f")) for n in MIXER_KINDS]
    columns += [(f"peak {labels[n]}", lambda s, n=n: human_bytes(s.systems[n].peak_bytes)) for n in SYSTEMS]
    title = (f"{report.model}: whole pipeline calls, {report.steps} steps, guidance {report.guidance:g}, "
             f"{report.device} {report.dtype}, systems in turns, median of {report.repeats}")  # fmt: skip
    lines: Rendered = [table(title, columns, report.sizes)]
    for name, side in report.crossover.items():
        where = f"faster than the original from {side} px on" if side else "not faster than the original"
        lines.append(f"{labels[name]}: {where} (at the sizes measured)")
    lines.append(f"peak memory: {report.memory}")
    lines += [f"{labels[n]} blocks: {source}" for n, source in report.adapters.items() if n != "original"]
    for size in report.sizes:
        lines += [
            f"{size.height}x{size.width}: skipped {labels[name]}: {timing.skipped}"
            for name, timing in size.systems.items()
            if timing.skipped
        ]
    return lines


def export_report(report: Any) -> Rendered:
    """``export``: what was written where, and what a user of the other project needs to know."""
    return [f"wrote {plural(report.blocks, 'block')} ({plural(report.tensors, 'tensor')}) in the "
            f"{report.format} layout to {report.out}", *report.notes]  # fmt: skip


def convert_report(report: Any) -> Rendered:
    """``convert``: the replaced layers and the parameter counts."""
    title = f"{report.denoiser_class} ({report.family}): {len(report.layers)} self-attention layers"
    columns: list[Column] = [
        ("layer", lambda layer: layer.name),
        ("stride", lambda layer: str(layer.grid_stride)),
        ("channels", lambda layer: str(layer.channels)),
        ("kernel", lambda layer: "-" if layer.kernel_size is None else str(layer.kernel_size)),
        ("attention params", lambda layer: f"{layer.attention_params:,}"),
        ("block params", lambda layer: f"{layer.block_params:,}"),
    ]
    out = Path(report.out)
    start = f"blocks start: {report.init}"
    if report.imported:
        start = _imported_lines(report)
    if report.calibration:
        fit = report.calibration
        start += (f", fitted to the teacher on {fit['samples']} images of {fit['data']} at "
                  f"{len(fit['timesteps'])} timesteps in {fit['seconds']:.0f} s "
                  f"({fit['summary']})")  # fmt: skip
    if report.base_model and not report.imported:
        start += f"\nbase model: {report.base_model}"
    return [
        table(title, columns, report.layers),
        start,
        *(f"warning: {warning}" for warning in report.warnings),
        f"parameters: {report.params_before:,} before, {report.params_after:,} after "
        f"(attention {report.params_removed:,} removed, {MIXER_LABELS[report.mixer]} blocks "
        f"{report.params_added:,} added)\n"
        f"stride: latent pixels per token. Wrote {out} (adapter in {out / 'deltaconv'}).",
    ]


def _imported_lines(report: Any) -> str:
    """Where imported blocks came from, what else they replaced and what they left alone."""
    imported = report.imported
    read = {"base": ", the model's copy (base:)", "base_ema": ", the EMA copy (base_ema:)"}
    lines = [f"blocks imported from {imported['source']} ({imported['format']} layout"
             f"{read.get(imported.get('key_nesting'), '')})"]  # fmt: skip
    if imported.get("scales_from"):
        scales = ", ".join(f"{s:g}" for s in imported["scales"])
        lines.append(f"scales ({scales}): {imported['scales_from']}")
    replaced = imported["replaced_tensors"]
    if replaced:
        shown = ", ".join(replaced[:3]) + (", ..." if len(replaced) > 3 else "")
        lines.append(
            f"also replaced {plural(len(replaced), 'other denoiser tensor')}: {shown} (all in the JSON)"
        )
    if imported["kept_attention"]:
        lines.append(f"kept the original self-attention at {plural(len(imported['kept_attention']), 'site')}")
    if imported.get("base_model_note"):
        lines.append(f"base model: {imported['base_model_note']}")
    return "\n".join(lines)


def distill_report(result: Any) -> Rendered:
    """``distill``: converted vs distilled student against the teacher, and where the outputs are."""
    report = result.report

    def adherence(row: dict[str, Any]) -> str:
        value = row.get("student_adherence")
        return "-" if value is None else f"{value:.3f} (teacher {row['teacher_adherence']:.3f})"

    columns: list[Column] = [
        ("student", lambda name: name),
        ("PSNR dB", lambda name: f"{report[name]['psnr_db']:.2f}"),
        ("SSIM", lambda name: f"{report[name]['ssim']:.3f}"),
        ("denoiser rel. error", lambda name: f"{report[name]['denoiser_relative_error']:.3f}"),
        ("adherence", lambda name: adherence(report[name])),
    ]
    title = f"teacher agreement on {len(report['prompts'])} fixed prompts and seeds"
    lines: Rendered = [table(title, columns, ["converted", "distilled"], left=0)]
    if report.get("resumed_from"):
        lines.append(f"resumed from {report['resumed_from']}")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    lines.append(f"adapter: {result.adapter_path}  losses: {result.out / 'loss.png'}")
    lines.append(f"teacher / converted / distilled grid: {result.out / 'report.png'}")
    return lines


def sample_report(report: Any, compare: bool) -> Rendered:
    """``sample``: how many images of which systems went where."""
    written = len(report.images) * (2 if compare else 1)
    systems = f"{report.system} and original" if compare else report.system
    tiling = "; tiled VAE decoding (larger than the VAE's native size)" if report.vae_tiling else ""
    return [
        f"{plural(written, 'image')} ({systems}, {report.scheduler}, {report.height}x{report.width}) "
        f"in {report.out}; grid: {report.grid}",
        f"peak memory: {human_bytes(report.peak_memory_bytes)} ({report.peak_memory_kind}){tiling}",
    ]


def eval_report(report: Any) -> Rendered:
    """``eval``: one row per system, then what was reused and skipped."""
    columns: list[Column] = [
        ("system", lambda r: r.name),
        (f"FID ({report.feature})", lambda r: _number(r.fid, ".2f")),
        ("CLIP", lambda r: _number(r.clip_score, ".2f")),
        ("PSNR vs orig.", lambda r: _number(r.psnr_db, ".2f")),
        ("SSIM", lambda r: _number(r.ssim, ".3f")),
        ("traj. rel. err.", lambda r: _number(r.denoiser_relative_error, ".3f")),
        ("adherence", lambda r: _number(r.adherence, ".3f")),
        ("s / image", lambda r: _number(r.seconds_per_image, ".3f")),
        ("peak memory", lambda r: human_bytes(r.peak_memory_bytes)),
    ]
    size = f"{report.height}x{report.width}"
    title = f"{report.model}: {plural(report.prompts, 'prompt')}, {size}, {report.device} {report.dtype}"
    lines: Rendered = [table(title, columns, report.systems, left=0)]
    reused = [r for r in report.systems if r.reused]
    lines += [f"reused the {plural(r.images, 'image')} of {r.name} (same settings)" for r in reused]
    lines.append(
        f"FID reference: {report.reference or 'none given'}; grid: {report.grid}; "
        f"JSON: {Path(report.out) / 'eval.json'}"
    )
    if report.timing:
        lines.append(f"time and memory: {report.timing}")
    if report.vae_tiling:
        lines.append("tiled VAE decoding: the images are larger than the VAE's native size")
    lines += [f"skipped {metric}: {why}" for metric, why in report.skipped.items()]
    return lines


def analyze_report(report: Any, paths: dict[str, Path]) -> Rendered:
    """``analyze``: locality per layer and band, and the recommended kernel sizes."""
    from .analyze import short_name

    def alpha(layer: Any) -> str:
        exponent, r2 = layer.power_law_exponent, layer.power_law_r2
        return "-" if exponent is None else f"{exponent:.2f} ({r2:.2f})"

    columns: list[Column] = [
        ("layer", lambda layer: short_name(layer.name)),
        ("band", lambda layer: layer.band),
        ("grid", lambda layer: f"{layer.grid[0]}x{layer.grid[1]}"),
        ("queries", lambda layer: str(layer.queries)),
        ("r50", lambda layer: f"{layer.radii['r50']:.1f}"),
        ("r90", lambda layer: f"{layer.radii['r90']:.1f}"),
        ("r90 uniform", lambda layer: f"{layer.uniform_radii['r90']:.1f}"),
        ("alpha (R²)", alpha),
        ("global", lambda layer: f"{layer.global_share:.1%}"),
        ("ΔConv k", lambda layer: str(layer.kernel_size)),
        ("coverage", lambda layer: f"{layer.delta_conv_coverage:.1%}"),
        ("rec. k", lambda layer: str(layer.recommended_kernel_size)),
        ("local", lambda layer: "yes" if layer.local else "no"),
    ]
    counts = f"{plural(len(report.prompts), 'prompt')}, {report.steps} steps"
    current = report.current_kernel_sizes
    advice = ", ".join(
        f"{stage} {k} (now {current[stage]})" for stage, k in report.recommended_kernel_sizes.items()
    )
    return [
        table(f"{report.model}: self-attention locality ({counts})", columns, report.layers),
        f"recommended kernel sizes: {advice}",
        f"wrote {', '.join(str(p) for p in paths.values())}",
        f"use them with: deltaconv convert {report.model} -o OUT --kernel-sizes {paths['kernel_sizes.json']}",
    ]


def inspect_report(report: Any) -> Rendered:
    """``inspect``: the layout a weights file is recognised as, its tensors by module, what convert does."""
    nesting = " and ".join(f"{group}:" for group in report.key_nesting) or "flat"
    facts = [
        ("format", report.format + (f" ({report.mixer} blocks)" if report.format == "deltaconv" else "")),
        ("family", report.family or "unknown"),
        ("blocks", str(report.blocks)),
        ("channels", ", ".join(map(str, report.channels)) or "-"),
        ("kernel sizes", ", ".join(map(str, report.kernel_sizes)) or "-"),
        ("gates per block", "-" if report.gates is None else str(report.gates)),
        ("scales", "not recorded" if report.scales is None else ", ".join(f"{s:g}" for s in report.scales)),
        (
            "feature MLP widths",
            ", ".join("dim_n" if w is None else str(w) for w in report.projection_mid_dims)
            if report.projection_mid_dims
            else "-",
        ),  # fmt: skip
        ("dtypes", ", ".join(f"{dtype} ({count})" for dtype, count in report.dtypes.items())),
        ("key nesting", nesting if report.format == "convfusion" else "-"),
        ("base model", report.base_model or "not known"),
        ("size", f"{plural(report.tensors, 'tensor')}, {human_bytes(report.bytes)}"),
    ]
    layout = table(report.source, [("", lambda row: row[0]), ("", lambda row: row[1])], facts, left=2)
    columns: list[Column] = [
        ("module", lambda group: group.module),
        ("convert --weights", lambda group: group.action),
        ("tensors", lambda group: str(group.tensors)),
        ("size", lambda group: human_bytes(group.bytes)),
    ]
    return [layout, table("tensors by module", columns, report.groups, left=2), *report.notes]


def env_report(report: dict[str, Any]) -> Rendered:
    """``env``: one line a fact, as a bug report quotes it."""
    blocks = report["blocks"]
    lines = [
        f"python {report['python']} on {report['platform']}",
        *(f"{package}: {version}" for package, version in report["packages"].items()),
        f"CUDA (torch build): {report['cuda'] or 'none'}",
        *(
            f"{d['device']}: {d['name']}, {d['memory_gib']} GiB"
            + (f", {d['cores']} cores" if "cores" in d else f", compute capability {d['capability']}")
            for d in report["devices"]
        ),
        f"blocks: {blocks['path']} on {blocks['device']} (backend {blocks['requested']}"
        + (f", {blocks['variable']!r} from DELTACONV_BACKEND" if blocks["variable"] else "")
        + ")",
    ]
    if blocks["problem"]:
        lines.append(f"blocks: {blocks['problem']}")
    if "self_check" in blocks:
        lines.append(f"Triton self-check: {blocks['self_check']}")
    for check in report["self_checks"]:
        lines.append(f"Triton self-check ({check['check']}): {'passed' if check['passed'] else 'FAILED'}, "
                     f"{check['detail']}")  # fmt: skip
    lines.append("SDPA: " + ", ".join(f"{name} {state}" for name, state in report["sdpa"].items()))
    return lines
