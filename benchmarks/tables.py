"""Markdown tables for BENCHMARKS.md from the JSON that deltaconv profile and eval write.

python benchmarks/tables.py profile docs/profile-sd15.json
python benchmarks/tables.py eval runs/eval/eval.json
python benchmarks/tables.py teacher demo_teacher/results/demo-teacher-quality.json [MORE.json ...]
python benchmarks/tables.py noised demo_teacher/results/demo-teacher-from-noised-scenes.json
python benchmarks/tables.py guidance-interval demo_teacher/results/guidance-interval-v2.json
python benchmarks/tables.py end-to-end docs/end-to-end-demo.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltaconv_cli.demo.domain import FAILURES
from deltaconv_cli.demo.quality import HELD_OUT_SEED
from deltaconv_cli.demo.recommended import RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS
from deltaconv_cli.errors import DeltaConvError, run_script
from deltaconv_cli.runtime import human_bytes, human_count

MIXERS = ("attention", "deltaconv", "linfusion")
DOCUMENTED_SCHEDULER = "DPMSolverMultistepScheduler"  # the demo teacher's own


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _shape(layer: dict) -> str:
    return f"{layer['grid'][0]}x{layer['grid'][1]}x{layer['channels']}"


def profile_table(report: dict) -> str:
    sites = len(report["resolutions"][0]["layers"])
    header = [
        "resolution",
        "MACs attention",
        "MACs ΔConv",
        "MACs LinFusion",
        "attn / ΔConv",
        "LinFusion / ΔConv",
    ]
    header.append("attn share of denoiser")
    measured = any(
        layer[m]["latency_ms"] is not None or layer[m]["skipped"]
        for r in report["resolutions"]
        for layer in r["layers"]
        for m in MIXERS
    )
    if measured:
        header += ["ms attention", "ms ΔConv", "ms LinFusion"]
        header += ["step ms: original", "step ms: ΔConv", "step ms: LinFusion"]
        how = f"measured on {report['device']}, {report['dtype']} (ms columns: sum over all sites)"
    else:
        how = "counted on the meta device (no weights, nothing run)"
    rows: list[list[str]] = []
    skipped: list[str] = []
    for r in report["resolutions"]:
        totals = r["totals_macs"]
        cells = [f"{r['height']}x{r['width']}", *(human_count(totals[m]) for m in MIXERS)]
        cells += [f"{r['attention_over_deltaconv']:,.1f}x", f"{r['linfusion_over_deltaconv']:.2f}x"]
        cells.append(f"{r['attention_share']:.1%}")
        if measured:
            for mixer in MIXERS:
                values = [layer[mixer]["latency_ms"] for layer in r["layers"]]
                reasons = {layer[mixer]["skipped"]: layer for layer in r["layers"] if layer[mixer]["skipped"]}
                skipped += [f"{_shape(layer)} {mixer} ({why})" for why, layer in reasons.items()]
                cells.append(_fmt(sum(values), ",.1f") if all(v is not None for v in values) else "-")
            cells += [_fmt(r["step_latency_ms"].get(m), ",.0f") for m in MIXERS]
            skipped += [
                f"{r['height']}x{r['width']} {m} step ({why})" for m, why in r["step_skipped"].items()
            ]
        rows.append(cells)
    lines = [
        f"**{report['model']}** ({report['denoiser_class']}), per image, "
        f"all {sites} self-attention sites; {how}",
        "",
        _table(header, rows),
    ]
    if skipped:
        lines += ["", "Not measured (shown as -): " + "; ".join(dict.fromkeys(skipped)) + "."]
    if report["paper_ratio_passed_at"]:
        where, ratio = report["paper_ratio_passed_at"], report["ratio_at_crossing"]
        lines += [
            "",
            f"attention/ΔConv passes the paper's {report['paper_ratio']:,}x at {where:,} px ({ratio:,.0f}x).",
        ]
    return "\n".join(lines)


def eval_table(report: dict) -> str:
    settings = report["settings"]
    header = ["system", f"FID ({report['feature']})", "PSNR vs original", "SSIM", "denoiser rel. error"]
    header += ["adherence", "s / image", "peak memory"]
    lines = [
        f"{report['model']}: {report['prompts']} prompts, {report['height']}x{report['width']}, "
        f"{settings['steps']} steps, guidance {settings['guidance']}"
        + (f" from {settings['guidance_start']:g} of the steps" if settings.get("guidance_start") else "")
        + f", {report['device']}",
        "",
    ]
    rows = []
    for s in report["systems"]:
        cells = [s["name"], _fmt(s["fid"], ".2f"), _fmt(s["psnr_db"], ".2f"), _fmt(s["ssim"], ".3f")]
        cells += [_fmt(s["denoiser_relative_error"], ".3f"), _fmt(s["adherence"], ".3f")]
        cells += [_fmt(s["seconds_per_image"], ".3f"), human_bytes(s["peak_memory_bytes"])]
        rows.append(cells)
    return "\n".join([*lines, _table(header, rows)])


_FACT_COUNTS = ("facts", "hold", *FAILURES)
_FACT_HEADINGS = ["facts", "hold", *(f"failed: {reason}" for reason in FAILURES)]


def _fact_cells(result: dict) -> list[str]:
    return [str(result["failed_facts"][k]) for k in _FACT_COUNTS]


def _sampler(result: dict) -> str:
    """A teacher result's guidance, and what else differs from the documented sampler on 200 captions."""
    label = [f"{result['guidance']:g}"]
    if result.get("steps", RECOMMENDED_STEPS) != RECOMMENDED_STEPS:
        label.append(f"{result['steps']} steps")
    if result.get("scheduler", DOCUMENTED_SCHEDULER) != DOCUMENTED_SCHEDULER:
        label.append(result["scheduler"])
    if result.get("guidance_rescale"):
        label.append(f"guidance rescale {result['guidance_rescale']:g}")
    if result.get("guidance_start"):
        label.append(f"guidance start {result['guidance_start']:g}")
    if result.get("captions", 200) != 200:
        label.append(f"{result['captions']} captions")
    if result.get("first_seed"):
        label.append(f"seeds from {result['first_seed']}")
    if result.get("caption_seed", HELD_OUT_SEED) != HELD_OUT_SEED:
        label.append(f"captions of seed {result['caption_seed']}")
    return ", ".join(label)


def teacher_table(results: list[dict]) -> str:
    kinds = [k for k in results[0]["adherence"] if k != "all"]
    header = ["guidance", "adherence", *(f"adherence: {k}" for k in kinds)]
    header += ["named objects drawn", "... in the named cell"]
    header += ["FD samples vs real", "FD real vs real", "FD between domains"]
    rows = []
    for r in results:
        cells = [_sampler(r), *(f"{r['adherence'][k]:.3f}" for k in ["all", *kinds])]
        named = r.get("named_objects", {})  # absent from results measured before it was reported
        cells += [_fmt(named.get(k), ".2f") for k in ("drawn", "in_named_cell")]
        cells += [f"{r[k]:.0f}" for k in ("fd_samples_vs_real", "fd_real_vs_real", "fd_between_domains")]
        rows.append(cells)
    tables = [_table(header, rows)]
    failed = [(f"samples, guidance {_sampler(r)}", r) for r in results if "failed_facts" in r]
    if "vae_reconstruction" in results[0]:  # the same for every guidance; absent from older results
        failed.append(("the real scenes through the VAE", results[0]["vae_reconstruction"]))
    if failed:  # absent from results measured before it existed
        header = ["images", "adherence", *_FACT_HEADINGS]
        rows = [[name, f"{r['adherence']['all']:.3f}", *_fact_cells(r)] for name, r in failed]
        tables.append(_table(header, rows))
    reliance = results[0].get("position_reliance")  # the same for every guidance; absent from older results
    if reliance is None:
        return "\n\n".join(tables)
    header = ["timestep", "x0 error, own caption", "x0 error, object moved", "moved / own"]
    rows = [
        [
            t,
            f"{e['own_caption']:.4f}",
            f"{e['moved_caption']:.4f}",
            f"{e['moved_caption'] / e['own_caption']:.3f}",
        ]
        for t, e in reliance.items()
    ]
    return "\n\n".join([*tables, _table(header, rows)])


def noised_table(results: list[dict]) -> str:
    """demo_teacher/adherence_from_noised_scenes.py: adherence and failed facts by where sampling starts."""
    kinds = list(results[0]["adherence"])
    header = ["strength", "sampling starts at t", *(f"adherence: {k}" for k in kinds), *_FACT_HEADINGS]
    rows = [[f"{r['strength']:g}", str(r["start_timestep"]), *(f"{r['adherence'][k]:.3f}" for k in kinds),
             *_fact_cells(r)] for r in results]  # fmt: skip
    return _table(header, rows)


def _guided_below(result: dict) -> str:
    """The timestep guidance starts below, and the guidance and caption count where not the usual."""
    label = [str(result["guided_below"])]
    if result["guidance"] != RECOMMENDED_GUIDANCE:
        label.append(f"guidance {result['guidance']:g}")
    if result.get("captions", 200) != 200:
        label.append(f"{result['captions']} captions")
    return ", ".join(label)


def guidance_interval_table(results: list[dict]) -> str:
    """demo_teacher/guidance_interval.py: adherence and failed facts by the timestep guidance starts below."""
    kinds = list(results[0]["adherence"])
    header = ["guided below t", *(f"adherence: {k}" for k in kinds), "... in the named cell", *_FACT_HEADINGS]
    rows = [[_guided_below(r), *(f"{r['adherence'][k]:.3f}" for k in kinds),
             f"{r['named_objects']['in_named_cell']:.2f}", *_fact_cells(r)] for r in results]  # fmt: skip
    return _table(header, rows)


def end_to_end_table(report: dict) -> str:
    systems = ("original", "deltaconv", "linfusion")
    labels = {"original": "original", "deltaconv": "ΔConv", "linfusion": "LinFusion"}
    header = ["size", *(f"s / image: {labels[n]}" for n in systems)]
    header += [f"speed-up: {labels[n]}" for n in systems[1:]]
    header += [f"peak: {labels[n]}" for n in systems]
    rows, skipped = [], []
    for size in report["sizes"]:
        timings = size["systems"]
        cells = [f"{size['height']}x{size['width']}" + (" (tiled VAE)" if size["vae_tiling"] else "")]
        cells += [_fmt(timings[n]["seconds_per_image"], ".3f") for n in systems]
        speedups = [size["speedup_over_original"][n] for n in systems[1:]]
        cells += ["-" if x is None else f"{x:.2f}x" for x in speedups]
        cells += [human_bytes(timings[n]["peak_bytes"]) for n in systems]
        skipped += [f"{size['height']} px {labels[n]} ({timings[n]['skipped']})" for n in systems
                    if timings[n]["skipped"]]  # fmt: skip
        rows.append(cells)
    lines = [
        f"{report['model']}: whole pipeline calls, {report['steps']} steps, guidance {report['guidance']:g}, "
        f"{report['device']} {report['dtype']}, systems in turns, median of {report['repeats']}",
        "",
        _table(header, rows),
    ]
    if skipped:
        lines += ["", "Not measured (shown as -): " + "; ".join(skipped) + "."]
    return "\n".join(lines)


TABLES = {
    "profile": profile_table,
    "eval": eval_table,
    "teacher": teacher_table,
    "noised": noised_table,
    "guidance-interval": guidance_interval_table,
    "end-to-end": end_to_end_table,
}


def read_results(path: Path) -> object:
    """The results JSON in ``path``; a missing or broken file is a user's mistake, told in one line."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise DeltaConvError(f"cannot read results from {path}: {why}") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=TABLES)
    parser.add_argument("json", type=Path, nargs="+", help="results files (several for teacher)")
    args = parser.parse_args()
    if args.kind != "teacher" and len(args.json) > 1:
        parser.error(f"{args.kind} takes one results file, got {len(args.json)}")
    results = [read_results(path) for path in args.json]
    try:
        if args.kind == "teacher":  # several result files, one table: each file holds a list of results
            print(teacher_table([r for file_results in results for r in file_results]))
        else:
            print(TABLES[args.kind](results[0]))
    except (KeyError, TypeError, IndexError) as error:  # JSON that another command wrote
        raise DeltaConvError(
            f"{args.kind}: not results of that kind ({type(error).__name__}: {error})"
        ) from None


if __name__ == "__main__":
    run_script(main)
