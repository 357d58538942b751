"""The ``deltaconv`` command: each subcommand parses options, calls one library function, prints."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from .errors import DeltaConvError

app = typer.Typer(
    name="deltaconv",
    help="Replace the self-attention of diffusers models with distilled ΔConvBlocks (ΔConvFusion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped or redirected output keeps whole tables (rich would cut them to 80 columns).
console = Console(width=None if sys.stdout.isatty() else 1000)
err_console = Console(stderr=True)

JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write every number as JSON to this file ('-' for stdout).")
]


@app.callback()
def quiet_libraries() -> None:
    """Our progress bars and messages replace the libraries' loading bars and advisory logs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()


class Gate(str, Enum):
    scaled = "scaled"
    sigmoid = "sigmoid"


def fail(message: str) -> typer.Exit:
    """Print ``message`` as one red line on stderr (never wrapped); raise the returned Exit(1)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def check_file_target(option: str, target: Path | None, suffix: str | None = None) -> None:
    """A clear error, before a command's work, for a file option (``--json``, ``--plot``) that could not be
    written once the work is done: a folder, a path through a file, or the wrong kind of file."""
    if target is None or str(target) == "-":
        return
    if target.is_dir():
        raise DeltaConvError(f"{option} {target} is a folder; give a file name")
    blocked = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if blocked is not None:
        raise DeltaConvError(f"{option} {target} cannot be written: {blocked} is a file, not a folder")
    if suffix is not None and target.suffix.lower() != suffix:
        raise DeltaConvError(f"{option} writes a {suffix[1:].upper()} file: give a name ending in {suffix}")


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DeltaConvError, or the file system's refusal, into one line on stderr and exit code 1; check
    ``--json`` before the work."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            check_file_target("--json", kwargs.get("json_out"))
            return command(*args, **kwargs)
        except DeltaConvError as err:
            raise fail(str(err)) from None
        except OSError as err:  # the file system refused: no space left, no permission, a read-only place
            raise fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err)) from None

    return run


def show(rendered: list[Any]) -> None:
    """Print a report's tables and lines (see :mod:`deltaconv_cli.reports`)."""
    for item in rendered:
        console.print(item, highlight=False)


def write_json(target: Path | None, data: dict[str, Any] | list[Any]) -> None:
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
    init: Annotated[
        str, typer.Option(help="teacher (start from each attention's uniform limit) or random (the paper).")
    ] = "teacher",
    calibration_data: Annotated[
        str | None,
        typer.Option(help="imagefolder or demo to fit the teacher start on (default: demo for the demo)."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Import released blocks instead of starting new ones: a ConvFusion .safetensors file (the "
            "ΔConv authors' students, distilled from Lykon/DreamShaper, SDXL base 1.0 or "
            "PixArt-Sigma-XL-2-512-MS: give that model as MODEL), a LinFusion folder, a deltaconv "
            "adapter, or a hub id (owner/name, hf://owner/name/path). The layout is read from the files; "
            "`deltaconv inspect` shows it.",
        ),
    ] = None,
    ema: Annotated[
        bool,
        typer.Option("--ema", help="With --weights: read a nested ConvFusion file's EMA copy (base_ema:)."),
    ] = False,
    scales: Annotated[
        str | None,
        typer.Option(
            help="With --weights: the scales of a ConvFusion file's gates, which it does not record, e.g. "
            "1,1/2,1/3 (needed for more than two gates per block; two are the authors' 1,1/2)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
    json_out: JsonOption = None,
) -> None:
    """Replace every self-attention of MODEL with a ΔConvBlock (new, or imported: --weights); write OUT."""
    from .convert import convert as run_convert
    from .interop import parse_scales

    sizes = _parse_kernel_sizes(kernel_size, kernel_sizes)
    report = run_convert(
        model, out, kernel_sizes=sizes, gate=gate.value, seed=seed, init=init,
        calibration_data=calibration_data, overwrite=overwrite, weights=weights, ema=ema,
        scales=parse_scales(scales) if scales is not None else None,
    )  # fmt: skip
    write_json(json_out, report.to_dict())
    if str(json_out) != "-":
        from . import reports  # imports torch: only once a command runs

        show(reports.convert_report(report))


@app.command()
@user_errors
def export(
    adapter: Annotated[Path, typer.Argument(help="An adapter folder, or a converted model folder.")],
    fmt: Annotated[
        str, typer.Option("--format", help="convfusion (the ΔConv authors' file) or linfusion (its folder).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The .safetensors file (convfusion) or folder (linfusion).")
    ],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    json_out: JsonOption = None,
) -> None:
    """Write an adapter in another project's layout, for the ΔConv authors' or LinFusion's own code."""
    from .interop import export_adapter

    report = export_adapter(adapter, fmt, out, overwrite=overwrite)
    write_json(json_out, asdict(report))
    if str(json_out) != "-":
        from . import reports  # imports torch: only once a command runs

        show(reports.export_report(report))


@app.command("env")
@user_errors
def env_command(json_out: JsonOption = None) -> None:
    """Versions, devices, which path the blocks take and the Triton kernels' self-check: for bug reports."""
    from .environment import collect_environment

    report = collect_environment()
    write_json(json_out, report)
    if str(json_out) != "-":
        from . import reports  # imports torch: only once a command runs

        show(reports.env_report(report))


@app.command("inspect")
@user_errors
def inspect_command(
    weights: Annotated[
        str,
        typer.Argument(
            help="A ConvFusion .safetensors file, a LinFusion or deltaconv adapter folder, a converted model "
            "folder, or a hub id (owner/name, hf://owner/name/path)."
        ),
    ],
    json_out: JsonOption = None,
) -> None:
    """Show what a weights file or folder holds and what `convert --weights` would do with it (reads only
    the safetensors header)."""
    from .inspection import inspect_weights

    report = inspect_weights(weights)
    write_json(json_out, report.to_dict())
    if str(json_out) != "-":
        from . import reports  # imports torch: only once a command runs

        show(reports.inspect_report(report))


def _parse_settings(values: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for DistillConfig fields, with values parsed as JSON where they parse."""
    from .distill import SETTING_NAMES as known

    settings = {}
    for item in values:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise DeltaConvError(
                f"--set takes KEY=VALUE with KEY one of {', '.join(sorted(known))}; got {item!r}"
            )
        try:
            settings[key] = json.loads(raw)
        except ValueError:
            settings[key] = raw
    return settings


@app.command()
@user_errors
def distill(
    model: Annotated[
        str, typer.Argument(help="Teacher pipeline (folder, hub id or demo) or a converted folder.")
    ] = "demo",
    data: Annotated[str, typer.Option(help="imagefolder with metadata.jsonl, or demo.")] = "demo",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: checkpoints, logs, adapter, report.")
    ] = Path("runs/distill"),
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the recipe's).")] = None,
    recipe: Annotated[
        str | None, typer.Option(help="sd15, sdxl, pixart-sigma, demo or a JSON file (default: by model).")
    ] = None,
    mixer: Annotated[str, typer.Option(help="deltaconv, or linfusion for the baseline.")] = "deltaconv",
    init: Annotated[
        str | None, typer.Option(help="teacher (start from the attention) or random (the paper's start).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT's last checkpoint.")] = False,
    adapter: Annotated[Path | None, typer.Option(help="Start from this saved adapter.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch per micro-step.")] = None,
    gradient_accumulation_steps: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    warmup_steps: Annotated[int | None, typer.Option()] = None,
    max_grad_norm: Annotated[float | None, typer.Option()] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="no, fp16 or bf16.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training image size in pixels.")] = None,
    caption_dropout: Annotated[float | None, typer.Option()] = None,
    checkpoint_every: Annotated[int | None, typer.Option()] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    kernel_size: Annotated[
        list[str], typer.Option("--kernel-size", "-k", help="K for every layer, or STAGE=K (repeatable).")
    ] = [],  # noqa: B006 - typer needs a literal default for list options
    set_: Annotated[
        list[str], typer.Option("--set", help="Any recipe setting: KEY=VALUE (repeatable).")
    ] = [],  # noqa: B006
    json_out: JsonOption = None,
) -> None:
    """Distil new blocks from the frozen teacher (docs/method.md §1.3); runs under `accelerate launch` too."""
    from . import distill as distillation

    overrides = {
        "steps": steps, "batch_size": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
        "learning_rate": learning_rate, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
        "mixed_precision": mixed_precision, "resolution": resolution, "caption_dropout": caption_dropout,
        "checkpoint_every": checkpoint_every, "gradient_checkpointing": gradient_checkpointing, "seed": seed,
        "kernel_sizes": _parse_kernel_sizes(kernel_size, None), "init": init,
    }  # fmt: skip
    overrides.update(_parse_settings(set_))
    config = distillation.config_for(model, recipe, mixer, **overrides)
    result = distillation.distill(model, data, out, config, resume=resume, adapter=adapter)
    if result.report is None:  # not the main process of a multi-process run
        return
    summary = {"out": str(result.out), "steps": result.steps_done, "adapter": str(result.adapter_path)}
    write_json(json_out, {**summary, **result.report})
    if str(json_out) != "-":
        from . import reports  # imports torch: only once a command runs

        show(reports.distill_report(result))


ModelArgument = Annotated[
    str, typer.Argument(help="Converted folder, teacher pipeline (with --adapter), hub id, or demo.")
]
AdapterOption = Annotated[
    Path | None, typer.Option(help="A saved adapter to mount (default: the model's own).")
]
DeviceOption = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if present).")]
DtypeOption = Annotated[
    str | None, typer.Option(help="float32, float16 or bfloat16 (default: fp16 on CUDA).")
]
GuidanceRescaleOption = Annotated[
    float, typer.Option(help="0-1: rescale guided predictions (for zero-terminal-SNR models; not PixArt).")
]
GuidanceStartOption = Annotated[
    float | None,
    typer.Option(
        help="0-1: share of the steps sampled unguided before guidance starts (default 0; demo: its "
        "recommended; not PixArt)."
    ),
]


def _prompt_list(prompt: list[str], prompts_file: str | None, required: bool = True) -> list[str]:
    from .evaluation import read_prompts

    if prompts_file is not None:
        prompt = [*prompt, *read_prompts(prompts_file)[0]]
    if not prompt and required:
        raise DeltaConvError("give --prompt TEXT (repeatable) or --prompts FILE (or demo:N)")
    return prompt


@app.command()
@user_errors
def sample(
    model: ModelArgument = "demo",
    adapter: AdapterOption = None,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = [],  # noqa: B006
    prompts_file: Annotated[
        str | None, typer.Option("--prompts", help="A file with one prompt per line, or demo:N.")
    ] = None,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    num_images: Annotated[
        int, typer.Option("--num-images", "-n", help="Images per prompt (seeds seed..).")
    ] = 1,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 20,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance (default 7.5; demo: its recommended).")
    ] = None,
    height: Annotated[int | None, typer.Option(help="Pixels (default: the model's native size).")] = None,
    width: Annotated[int | None, typer.Option(help="Pixels (default: the model's native size).")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="ddim, euler, euler-a, dpm++, heun, pndm, unipc.")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option()] = None,
    guidance_rescale: GuidanceRescaleOption = 0.0,
    guidance_start: GuidanceStartOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs and the grid.")] = Path(
        "samples"
    ),
    compare: Annotated[
        bool, typer.Option("--compare", help="Also render the original with the same seeds.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per pipeline call.")] = 4,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    json_out: JsonOption = None,
) -> None:
    """Generate images (one PNG per prompt and seed, settings in its metadata, and a grid)."""
    from .sampling import SampleSettings
    from .sampling import sample as run_sample

    if num_images < 1:
        raise DeltaConvError(f"--num-images must be at least 1, got {num_images}")
    settings = SampleSettings(steps, guidance, height, width, scheduler, negative_prompt, guidance_rescale,
                              guidance_start)  # fmt: skip
    seeds = list(range(seed, seed + num_images))
    report = run_sample(
        model, _prompt_list(prompt, prompts_file), seeds, out, settings, adapter=adapter, compare=compare,
        device=device, dtype=dtype, batch_size=batch_size,
    )  # fmt: skip
    if report is None:  # not the main process of a multi-process run
        return
    write_json(json_out, asdict(report))
    if str(json_out) != "-":
        from . import reports  # imports torch: only once a command runs

        show(reports.sample_report(report, compare))


@app.command("eval")
@user_errors
def eval_command(
    model: ModelArgument = "demo",
    adapter: Annotated[Path | None, typer.Option(help="ΔConv adapter (default: the model's own).")] = None,
    linfusion_adapter: Annotated[
        Path | None, typer.Option(help="LinFusion adapter (distill --mixer linfusion).")
    ] = None,
    original: Annotated[
        bool, typer.Option("--original/--no-original", help="Include the original model.")
    ] = True,
    prompts: Annotated[
        str, typer.Option(help="A prompt file, or demo:N (held-out demo captions).")
    ] = "demo:200",
    reference: Annotated[
        str | None, typer.Option(help="Real-image folder, 'original', or demo (default on the demo).")
    ] = None,
    feature: Annotated[
        str | None,
        typer.Option(help="FID features: inception (real models) or domain (demo only; its default)."),
    ] = None,
    clip: Annotated[str | None, typer.Option(help="Local CLIP model folder for CLIP score.")] = None,
    seed: Annotated[int, typer.Option(help="Prompt i uses seed + i.")] = 0,
    steps: Annotated[int, typer.Option()] = 20,
    guidance: Annotated[float | None, typer.Option(help="Default 7.5; demo: its recommended.")] = None,
    guidance_rescale: GuidanceRescaleOption = 0.0,
    guidance_start: GuidanceStartOption = None,
    height: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    scheduler: Annotated[str | None, typer.Option()] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    trajectory_prompts: Annotated[int, typer.Option(help="Prompts for the trajectory comparison.")] = 8,
    timing_rounds: Annotated[
        int, typer.Option(help="Timed rounds of one image per system, systems in turns (0: no timing).")
    ] = 3,
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("eval"),
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    json_out: JsonOption = None,
) -> None:
    """Compare the original model, the ΔConv and the LinFusion student on the same prompts and seeds."""
    from .evaluation import EvalSettings, evaluate, read_prompts

    prompt_list, source = read_prompts(prompts)
    settings = EvalSettings(steps, guidance, height, width, scheduler, seed, batch_size, feature, clip,
                            trajectory_prompts, timing_rounds, guidance_rescale, guidance_start)  # fmt: skip
    quiet = str(json_out) == "-"
    with err_console.status("evaluating", spinner="dots") as status:
        report = evaluate(
            model, prompt_list, out, settings, adapter=adapter, linfusion_adapter=linfusion_adapter,
            include_original=original, reference=reference, device=device, dtype=dtype,
            on_progress=None if quiet else status.update,
        )  # fmt: skip
    write_json(json_out, asdict(report))
    for warning in report.warnings:  # on stderr, so also beside --json -
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if quiet:
        return
    from . import reports  # imports torch: only once a command runs

    show(reports.eval_report(report))


@app.command()
@user_errors
def analyze(
    model: ModelArgument = "demo",
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = [],  # noqa: B006
    prompts_file: Annotated[
        str | None, typer.Option("--prompts", help="A file with one prompt per line, or demo:N.")
    ] = None,
    timesteps: Annotated[
        list[str], typer.Option(help="Timestep band edges, e.g. 333,666 (bands [0,333), [333,666), [666,T)).")
    ] = ["333,666"],  # noqa: B006
    res: Annotated[tuple[int, int] | None, typer.Option("--res", help="Height and width in pixels.")] = None,
    layers: Annotated[
        list[str], typer.Option("--layers", help="Only these layers or stages (repeatable).")
    ] = [],  # noqa: B006
    queries: Annotated[
        int, typer.Option(help="Query positions sampled per layer and call (all if fewer).")
    ] = 256,
    steps: Annotated[int, typer.Option()] = 20,
    guidance: Annotated[float | None, typer.Option(help="Default 7.5; demo: its recommended.")] = None,
    guidance_start: GuidanceStartOption = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("analysis"),
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    json_out: JsonOption = None,
) -> None:
    """Measure how local each self-attention layer is during real sampling; recommend kernel sizes."""
    from .analyze import analyze as run_analysis
    from .analyze import write_outputs
    from .runtime import check_output_folder

    try:
        edges = [int(edge) for text in timesteps for edge in text.split(",") if edge.strip()]
    except ValueError:
        raise DeltaConvError(f"--timesteps takes integers, got {timesteps}") from None
    height, width = res if res is not None else (None, None)
    prompts = _prompt_list(prompt, prompts_file, required=False)  # none: the library's defaults
    check_output_folder(out)  # before the sampling, not once its results are to be written
    with err_console.status("sampling and recording attention", spinner="dots"):
        report = run_analysis(
            model, prompts, height=height, width=width, steps=steps,
            guidance=guidance, guidance_start=guidance_start, band_edges=edges, layers=layers or None,
            queries=queries, seed=seed,
            device=device, dtype=dtype,
        )  # fmt: skip
    paths = write_outputs(report, out)
    write_json(json_out, asdict(report))
    if str(json_out) == "-":
        return
    from . import reports  # imports torch: only once a command runs

    show(reports.analyze_report(report, paths))


def _looks_like_resolution(text: str) -> bool:
    return all(part.isdigit() for part in text.lower().replace(",", "x").split("x"))


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def profile(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            help="sd15, sd21, sdxl, pixart-sigma, or a diffusers folder / hub id (config only; with "
            "--end-to-end a pipeline with weights, e.g. demo)."
        ),
    ] = "sd15",
    res: Annotated[
        list[str],
        typer.Option("--res", help="Resolutions in pixels: N or HxW; several may follow one --res."),
    ] = [],  # noqa: B006 - typer needs a literal default for list options
    device: Annotated[
        str | None,
        typer.Option(help="Device to time on (default: cpu; with --end-to-end cuda if present)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="float32, float16 or bfloat16 (default float32; end to end on CUDA float16)."),
    ] = None,
    measure: Annotated[bool, typer.Option("--measure", help="Also time each mixer and whole steps.")] = False,
    end_to_end: Annotated[
        bool,
        typer.Option(
            "--end-to-end",
            help="Time whole pipeline calls (prompt to image) of the original, ΔConv and LinFusion in "
            "turns at each resolution; report peak memory and where the converted model pays off.",
        ),
    ] = False,
    adapter: Annotated[
        Path | None, typer.Option(help="--end-to-end: ΔConv adapter (default: the model's own or random).")
    ] = None,
    linfusion_adapter: Annotated[
        Path | None, typer.Option(help="--end-to-end: LinFusion adapter (default: random weights).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="--end-to-end: sampler steps per image (default 4).")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Timed repeats per measurement, median (default 5; end to end 3).")
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(help="Skip a measurement estimated to take longer, s (default 30; end to end 300)."),
    ] = None,
    json_out: JsonOption = None,
    plot_out: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of cost (or end-to-end time) vs resolution.")
    ] = None,
) -> None:
    """Cost of self-attention vs ΔConvBlock vs LinFusion; --end-to-end: whole pipelines vs image size."""
    from . import profile as profiling

    check_file_target("--plot", plot_out, ".png")
    given = [*res, *ctx.args]
    if _looks_like_resolution(model) and not Path(model).exists():  # `--res 512 1024` fills MODEL
        given, model = [*given, model], "sd15"
    if not all(_looks_like_resolution(r) for r in given):
        bad = next(r for r in given if not _looks_like_resolution(r))
        raise DeltaConvError(f"unexpected argument {bad!r}; resolutions are N or HxW in pixels")
    resolutions = [profiling.parse_resolution(r) for text in given for r in text.split(",") if r]
    end_to_end_only = {"--adapter": adapter, "--linfusion-adapter": linfusion_adapter, "--steps": steps}
    if end_to_end and measure:
        raise DeltaConvError("--measure times mixers and steps, --end-to-end whole pipelines: give one")
    if not end_to_end and any(v is not None for v in end_to_end_only.values()):
        flag = next(name for name, v in end_to_end_only.items() if v is not None)
        raise DeltaConvError(f"{flag} applies to --end-to-end timing only")
    if not (end_to_end or measure) and (repeats is not None or time_budget is not None):
        flag = "--repeats" if repeats is not None else "--time-budget"
        raise DeltaConvError(f"{flag} applies to timing only: add --measure or --end-to-end")
    timing = {key: value for key, value in (("repeats", repeats), ("time_budget_s", time_budget))
              if value is not None}  # fmt: skip
    quiet = str(json_out) == "-"
    with err_console.status("profiling", spinner="dots") as status:
        progress = None if quiet else lambda message: status.update(message)
        if end_to_end:
            if steps is not None:
                timing["steps"] = steps
            report = profiling.end_to_end(
                model, resolutions, adapter=adapter, linfusion_adapter=linfusion_adapter, device=device,
                dtype=dtype, on_progress=progress, **timing,
            )  # fmt: skip
        else:
            report = profiling.profile(
                model, resolutions or [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096)],
                device=device or "cpu", dtype=dtype or "float32", measure=measure, on_progress=progress,
                **timing,
            )  # fmt: skip
    write_json(json_out, report.to_dict())
    if plot_out is not None:
        (profiling.plot_end_to_end if end_to_end else profiling.plot)(report, plot_out)
    if quiet:
        return
    from . import reports  # imports torch: only once a command runs

    show(reports.end_to_end_report(report) if end_to_end else reports.profile_report(report, measure))
    if plot_out is not None:
        console.print(f"plot: {plot_out}")


if __name__ == "__main__":
    app()
