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


def _not_available(name: str, issue: str) -> Callable[[], None]:
    def command() -> None:
        raise fail(f"`deltaconv {name}` is not available yet in this version ({issue}).")

    command.__doc__ = f"Not available yet: {issue}."
    return command


for _name, _what in (
    ("distill", "teacher-student distillation"),
    ("sample", "image generation"),
    ("profile", "FLOPs, memory and latency"),
    ("eval", "FID, CLIP score and agreement"),
    ("analyze", "attention locality analysis"),
):
    app.command(_name)(_not_available(_name, _what))


if __name__ == "__main__":
    app()
