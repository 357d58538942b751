"""The ``deltaconv`` command: each subcommand parses options, calls one library function, prints."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import DeltaConvError

app = typer.Typer(
    name="deltaconv",
    help="Replace the self-attention of diffusers models with distilled ΔConvBlocks (ΔConvFusion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write every number as JSON to this file ('-' for stdout).")
]


class Gate(str, Enum):
    scaled = "scaled"
    sigmoid = "sigmoid"


def fail(message: str) -> typer.Exit:
    """Print ``message`` as one red line on stderr (never wrapped); raise the returned Exit(1)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DeltaConvError into one line on stderr and exit code 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DeltaConvError as err:
            raise fail(str(err)) from None

    return run


def write_json(target: Path | None, data: dict[str, Any]) -> None:
    if target is None:
        return
    text = json.dumps(data, indent=2)
    if str(target) == "-":
        sys.stdout.write(text + "\n")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")


def _parse_kernel_sizes(values: list[str], file: Path | None) -> int | dict[str, int] | None:
    from .surgery import read_kernel_sizes_file

    sizes: dict[str, int] = read_kernel_sizes_file(file) if file else {}
    for value in values:
        stage, sep, number = value.rpartition("=")
        try:
            size = int(number)
        except ValueError:
            raise DeltaConvError(f"--kernel-size takes K or STAGE=K, got {value!r}") from None
        if not sep:
            if len(values) > 1 or file:
                raise DeltaConvError("a bare --kernel-size K applies to every layer; give it alone")
            return size
        sizes[stage] = size
    return sizes or None


@app.command()
@user_errors
def convert(
    model: Annotated[str, typer.Argument(help="Hub id, or a local diffusers pipeline or denoiser folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the converted model to.")],
    kernel_size: Annotated[
        list[str],
        typer.Option(
            "--kernel-size", "-k", help="K for every layer, or STAGE=K (repeatable), e.g. mid_block=3."
        ),
    ] = [],  # noqa: B006 - typer needs a literal default for list options
    kernel_sizes: Annotated[
        Path | None, typer.Option("--kernel-sizes", help="JSON file mapping stage or layer names to K.")
    ] = None,
    gate: Annotated[Gate, typer.Option(help="Gate of the conv branches.")] = Gate.scaled,
    seed: Annotated[int, typer.Option(help="Seed of the blocks' random initialisation.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
    json_out: JsonOption = None,
) -> None:
    """Replace every self-attention of MODEL with a ΔConvBlock and write the result to OUT."""
    from .convert import convert as run_convert

    sizes = _parse_kernel_sizes(kernel_size, kernel_sizes)
    report = run_convert(model, out, kernel_sizes=sizes, gate=gate.value, seed=seed, overwrite=overwrite)
    write_json(json_out, report.to_dict())
    if str(json_out) == "-":
        return
    table = Table(
        title=f"{report.denoiser_class} ({report.family}): {len(report.layers)} self-attention layers"
    )
    for column in ("layer", "stride", "channels", "kernel", "attention params", "block params"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in report.layers:
        table.add_row(
            layer.name,
            str(layer.grid_stride),
            str(layer.channels),
            str(layer.kernel_size),
            f"{layer.attention_params:,}",
            f"{layer.block_params:,}",
        )
    console.print(table)
    console.print(
        f"parameters: {report.params_before:,} before, {report.params_after:,} after "
        f"(attention {report.params_removed:,} removed, ΔConv blocks {report.params_added:,} added)\n"
        f"stride: latent pixels per token. Wrote {out} (adapter in {out / 'deltaconv'})."
    )


def _looks_like_resolution(text: str) -> bool:
    return all(part.isdigit() for part in text.lower().replace(",", "x").split("x"))


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def profile(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(help="sd15, sd21, sdxl, pixart-sigma, or a diffusers folder / hub id (config only)."),
    ] = "sd15",
    res: Annotated[
        list[str],
        typer.Option("--res", help="Resolutions in pixels: N or HxW; several may follow one --res."),
    ] = [],  # noqa: B006 - typer needs a literal default for list options
    device: Annotated[str, typer.Option(help="Device for --measure (cpu, cuda, cuda:1, ...).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    measure: Annotated[bool, typer.Option("--measure", help="Also time each mixer and whole steps.")] = False,
    repeats: Annotated[int, typer.Option(help="Timed repeats per measurement (median).")] = 5,
    time_budget: Annotated[
        float, typer.Option(help="Skip a measurement estimated to take longer (s).")
    ] = 30.0,
    json_out: JsonOption = None,
    plot_out: Annotated[
        Path | None, typer.Option("--plot", help="Write a log-log PNG of cost vs resolution.")
    ] = None,
) -> None:
    """FLOPs, parameters, memory (and with --measure latency) of self-attention vs ΔConvBlock vs LinFusion."""
    from . import profile as profiling

    given = [*res, *ctx.args]
    if _looks_like_resolution(model) and not Path(model).exists():  # `--res 512 1024` fills MODEL
        given, model = [*given, model], "sd15"
    if not all(_looks_like_resolution(r) for r in given):
        bad = next(r for r in given if not _looks_like_resolution(r))
        raise DeltaConvError(f"unexpected argument {bad!r}; resolutions are N or HxW in pixels")
    resolutions = [profiling.parse_resolution(r) for text in given for r in text.split(",") if r]
    resolutions = resolutions or [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096)]
    quiet = str(json_out) == "-"
    with err_console.status("profiling", spinner="dots") as status:
        report = profiling.profile(
            model,
            resolutions,
            device=device,
            dtype=dtype,
            measure=measure,
            repeats=repeats,
            time_budget_s=time_budget,
            on_progress=None if quiet else lambda message: status.update(message),
        )
    write_json(json_out, report.to_dict())
    if plot_out is not None:
        profiling.plot(report, plot_out)
    if quiet:
        return
    _print_profile(report, measure)
    if plot_out is not None:
        console.print(f"plot: {plot_out}")


def _print_profile(report: Any, measured: bool) -> None:
    from .profile import MIXERS, human_bytes, human_count

    title = f"{report.model} ({report.denoiser_class}): multiply-adds per image, all self-attention sites"
    summary = Table(title=title)
    columns = ["resolution", "top grid", "attention", "ΔConv", "LinFusion", "attn/ΔConv", "LinFusion/ΔConv"]
    columns += ["attn share of denoiser"]
    if measured:
        columns += ["step ms: attention", "ΔConv", "LinFusion"]
    for column in columns:
        summary.add_column(column, justify="right")
    for r in report.resolutions:
        top = max((layer.grid for layer in r.layers), key=lambda g: g[0] * g[1])
        row = [f"{r.height}x{r.width}", f"{top[0]}x{top[1]}"]
        row += [human_count(r.total(m)) for m in MIXERS]
        row += [
            f"{r.attention_over_deltaconv:,.1f}x",
            f"{r.linfusion_over_deltaconv:.2f}x",
            f"{r.attention_share:.1%}",
        ]
        if measured:
            row += [f"{r.step_latency_ms[m]:,.0f}" if m in r.step_latency_ms else "skipped" for m in MIXERS]
        summary.add_row(*row)
    console.print(summary)

    for r in report.resolutions:
        table = Table(title=f"{r.height}x{r.width}: per layer shape (n = layers of that shape)")
        columns = [
            "stage",
            "grid",
            "C",
            "k",
            "n",
            "MACs attn",
            "ΔConv",
            "LinFusion",
            "act. attn",
            "ΔConv",
            "LinFusion",
        ]
        if measured:
            columns += ["ms attn", "ΔConv", "LinFusion"]
        for column in columns:
            table.add_column(column, justify="left" if column == "stage" else "right")
        shapes: dict[tuple, list] = {}
        for layer in r.layers:
            shapes.setdefault((layer.stage, layer.grid, layer.channels, layer.kernel_size), []).append(layer)
        for (stage, grid, channels, k), layers in shapes.items():
            first = layers[0]
            row = [stage, f"{grid[0]}x{grid[1]}", str(channels), str(k), str(len(layers))]
            row += [human_count(getattr(first, m).macs) for m in MIXERS]
            row += [human_count(getattr(first, m).params) for m in MIXERS]
            row += [human_bytes(getattr(first, m).activation_bytes) for m in MIXERS]
            if measured:
                row += [
                    f"{getattr(first, m).latency_ms:,.2f}"
                    if getattr(first, m).latency_ms is not None
                    else "skipped"
                    for m in MIXERS
                ]
            table.add_row(*row)
        console.print(table)
        skipped = {
            f"{m} {layer.grid[0]}x{layer.grid[1]}x{layer.channels}": getattr(layer, m).skipped
            for layer in r.layers
            for m in MIXERS
            if getattr(layer, m).skipped
        }
        skipped.update({f"{m} step": why for m, why in r.step_skipped.items()})
        for what, why in skipped.items():
            console.print(f"  skipped {what}: {why}", highlight=False)
    if report.paper_ratio_passed_at:
        console.print(
            f"attention/ΔConv passes the paper's {report.paper_ratio:,}x at "
            f"{report.paper_ratio_passed_at:,} px square ({report.ratio_at_crossing:,.0f}x there)."
        )
    else:
        console.print(f"attention/ΔConv does not reach the paper's {report.paper_ratio:,}x below 65,536 px.")


def _not_available(name: str, issue: str) -> Callable[[], None]:
    def command() -> None:
        raise fail(f"`deltaconv {name}` is not available yet in this version ({issue}).")

    command.__doc__ = f"Not available yet: {issue}."
    return command


for _name, _what in (
    ("distill", "teacher-student distillation"),
    ("sample", "image generation"),
    ("eval", "FID, CLIP score and agreement"),
    ("analyze", "attention locality analysis"),
):
    app.command(_name)(_not_available(_name, _what))


if __name__ == "__main__":
    app()
