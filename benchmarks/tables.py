"""Markdown tables for BENCHMARKS.md from the JSON that deltaconv profile and eval write.

python benchmarks/tables.py profile docs/profile-sd15.json
python benchmarks/tables.py eval runs/eval/eval.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deltaconv_cli.profile import human_bytes, human_count

MIXERS = ("attention", "deltaconv", "linfusion")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


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
    header += ["attn share of denoiser", "ms attention", "ms ΔConv", "ms LinFusion"]
    header += ["step ms: original", "step ms: ΔConv", "step ms: LinFusion"]
    lines = [
        f"**{report['model']}** ({report['denoiser_class']}), per image, all {sites} self-attention sites; "
        f"measured on {report['device']}, {report['dtype']} (ms columns: sum over all sites)",
        "",
        _row(header),
        _row(["---"] * len(header)),
    ]
    skipped: set[str] = set()
    for r in report["resolutions"]:
        totals = r["totals_macs"]
        cells = [f"{r['height']}x{r['width']}", *(human_count(totals[m]) for m in MIXERS)]
        cells += [f"{r['attention_over_deltaconv']:,.1f}x", f"{r['linfusion_over_deltaconv']:.2f}x"]
        cells.append(f"{r['attention_share']:.1%}")
        for mixer in MIXERS:
            values = [layer[mixer]["latency_ms"] for layer in r["layers"]]
            skipped |= {layer[mixer]["skipped"] for layer in r["layers"] if layer[mixer]["skipped"]}
            cells.append(_fmt(sum(values), ",.1f") if all(v is not None for v in values) else "-")
        cells += [_fmt(r["step_latency_ms"].get(m), ",.0f") for m in MIXERS]
        skipped |= set(r["step_skipped"].values())
        lines.append(_row(cells))
    if skipped:
        lines += ["", "Not measured (shown as -): " + "; ".join(sorted(skipped)) + "."]
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
        f"{settings['steps']} steps, guidance {settings['guidance']}, {report['device']}",
        "",
        _row(header),
        _row(["---"] * len(header)),
    ]
    for s in report["systems"]:
        cells = [s["name"], _fmt(s["fid"], ".2f"), _fmt(s["psnr_db"], ".2f"), _fmt(s["ssim"], ".3f")]
        cells += [_fmt(s["denoiser_relative_error"], ".3f"), _fmt(s["adherence"], ".3f")]
        cells += [_fmt(s["seconds_per_image"], ".3f"), human_bytes(s["peak_memory_bytes"])]
        lines.append(_row(cells))
    return "\n".join(lines)


def main() -> None:
    kind, path = sys.argv[1], Path(sys.argv[2])
    report = json.loads(path.read_text())
    print(profile_table(report) if kind == "profile" else eval_table(report))


if __name__ == "__main__":
    main()
