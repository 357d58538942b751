"""``deltaconv sample``: images from a converted model (and from the original with the same seeds).

Each image has its own CPU generator seeded by its seed, so its initial noise depends only on its seed,
not on batching or on how many processes share the work. The same settings and batch size give the same
pixels; another batch size can change a pixel by one grey level, because CPU and GPU math libraries pick
other kernels (other summation orders) for other batch shapes. Under ``accelerate launch`` the
(prompt, seed) jobs are split between processes with accelerate's ``split_between_processes``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .architectures import Family, denoiser_of, family_for, latent_size, latent_stride, native_latent_side
from .conditioning import use_tiled_vae
from .errors import DeltaConvError
from .imaging import save_grid, to_uint8
from .interop import adapter_for
from .loading import load_model, locate_pipeline
from .progress import advance, progress_bar
from .runtime import (
    PeakMemory,
    check_output_folder,
    check_seeds,
    checked_device,
    default_device,
    torch_dtype,
)
from .surgery import DeltaConvAdapter

StepCallback = Callable[[], None] | None  # called after every denoising step (progress)
# The pipeline fixes at the start of a call whether each step runs the caption-free half of the batch
# (guidance > 1); at exactly 1 it would drop that half and a later step could not bring it back. Steps
# before guidance starts keep it at a weight this close to none.
UNGUIDED = 1.0 + 1e-6
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}


@dataclass
class SampleSettings:
    steps: int = 20
    guidance: float | None = None  # default: the model's recommended guidance (for_model)
    height: int | None = None  # default: the model's native size
    width: int | None = None
    scheduler: str | None = None  # default: the pipeline's own
    negative_prompt: str | None = None
    # diffusers' rescale of the guided prediction to the conditional one's spread (Lin et al. 2024, §3.4),
    # for models trained to zero SNR at the last timestep; 0 leaves guidance as it is
    guidance_rescale: float = 0.0
    # the share of the denoising steps sampled with the conditional prediction alone before guidance starts
    # (diffusers' guiders call it ``start``): where the layout is decided, guidance adds objects.
    # Default: the model's recommended start (for_model)
    guidance_start: float | None = None

    def check(self) -> None:
        """A clear error for settings no model can use (checked before any model is loaded)."""
        if self.steps < 1:
            raise DeltaConvError(f"steps must be at least 1, got {self.steps}")
        if self.guidance is not None and (not math.isfinite(self.guidance) or self.guidance < 0):
            raise DeltaConvError(f"guidance must be a finite number >= 0, got {self.guidance}")
        for name, value in (("height", self.height), ("width", self.width)):
            if value is not None and value <= 0:
                raise DeltaConvError(f"{name} must be a positive number of pixels, got {value}")
        if self.scheduler is not None:
            check_scheduler(self.scheduler)
        if not 0 <= self.guidance_rescale <= 1:
            raise DeltaConvError(f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.guidance_start is not None and not 0 <= self.guidance_start <= 1:
            raise DeltaConvError(f"guidance start must be in [0, 1], got {self.guidance_start}")
        if self.guidance_start and self.guidance is not None and self.guidance <= 1:
            raise DeltaConvError(f"a guidance start needs guidance above 1, got {self.guidance}")

    def check_family(self, family: Family) -> None:
        """A clear error for settings this model family's pipeline cannot take."""
        if self.guidance_rescale and not family.guidance_rescale:
            raise DeltaConvError(f"{family.label} pipelines have no guidance rescale; leave it at 0")
        if self.guidance_start and not family.late_guidance:
            raise DeltaConvError(
                f"{family.label} pipelines fix guidance for the whole call; leave the guidance start at 0"
            )

    def check_model(self, model: str | Path, purpose: str = "sampling") -> None:
        """:meth:`check_family` for the pipeline at ``model``, read from its configs (nothing loaded);
        ``purpose`` names what needs a whole pipeline where ``model`` is a bare denoiser."""
        self.check_family(family_for(locate_pipeline(model, purpose, config_only=True).meta_denoiser()))

    def for_model(self, model: str | Path) -> SampleSettings:
        """These settings with ``model``'s recommended guidance and guidance start where they are unset:
        the demo teacher's own (a start only where it is guided), else SD's 7.5 from the first step."""
        from .demo import DEMO
        from .demo.recommended import RECOMMENDED_GUIDANCE, RECOMMENDED_GUIDANCE_START

        demo = str(model) == DEMO
        guidance = self.guidance
        if guidance is None:
            guidance = RECOMMENDED_GUIDANCE if demo else 7.5
        start = self.guidance_start
        if start is None:
            start = RECOMMENDED_GUIDANCE_START if demo and guidance > 1 else 0.0
        return replace(self, guidance=guidance, guidance_start=start)


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise DeltaConvError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DeltaConvError(f"batch size must be at least 1, got {batch_size}")


@dataclass
class LoadedModel:
    pipe: Any
    adapter: DeltaConvAdapter | None
    model: str
    adapter_path: str | None
    vae_factor: int

    @property
    def system(self) -> str:
        return self.adapter.config.mixer if self.adapter is not None else "original"


def load_for_sampling(
    model: str, adapter: str | Path | None = None, device: str | None = None, dtype: str | None = None
) -> LoadedModel:
    """The pipeline of ``model`` with its adapter mounted: ``adapter`` if given, else the converted
    folder's own; a model without either samples as the original."""
    device = checked_device(device or default_device())
    weights_dtype = torch_dtype(dtype or ("float16" if device.type == "cuda" else "float32"))
    folder = locate_pipeline(model, "sampling")
    pipe = load_model(folder, torch_dtype=weights_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    path = Path(adapter) if adapter is not None else folder.adapter_path if folder.is_converted else None
    blocks = adapter_for(path, pipe).mount(pipe) if path is not None else None
    return LoadedModel(pipe, blocks, str(model), str(path) if path else None, folder.vae_factor)


def resolve_size(loaded: LoadedModel, height: int | None, width: int | None) -> tuple[int, int]:
    """The requested size, or the model's native one; a clear error for sizes the model cannot take."""
    denoiser = denoiser_of(loaded.pipe)
    native = native_latent_side(denoiser)
    height = native * loaded.vae_factor if height is None else height
    width = native * loaded.vae_factor if width is None else width
    latent_size(height, width, loaded.vae_factor, latent_stride(denoiser))
    return height, width


def set_scheduler(pipe: Any, name: str | None) -> str:
    if name is None:
        return type(pipe.scheduler).__name__
    check_scheduler(name)
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    return type(pipe.scheduler).__name__


def pipeline_images(pipe: Any, prompts: list[str], seeds: list[int], size: tuple[int, int],
                    settings: SampleSettings, on_step: StepCallback = None) -> list[np.ndarray]:  # fmt: skip
    """uint8 images for (prompt, seed) pairs, each latent drawn from a CPU generator seeded by its seed
    (so its starting noise does not depend on what else is in the batch); ``on_step`` is called after
    every denoising step."""
    family = family_for(denoiser_of(pipe))
    settings.check_family(family)
    extra: dict[str, Any] = dict(family.pipeline_options)
    if settings.guidance_rescale:
        extra["guidance_rescale"] = settings.guidance_rescale
    guidance, first_guided = settings.guidance, 0
    if settings.guidance_start:
        # diffusers' dynamic-guidance pattern: a step-end callback sets the next step's scale. The first
        # guided step counts the denoising loop's steps (Heun's loop runs two per step but the last).
        pipe.scheduler.set_timesteps(settings.steps)
        first_guided = int(settings.guidance_start * len(pipe.scheduler.timesteps) + 1e-9)
        guidance = settings.guidance if first_guided == 0 else UNGUIDED

    def after_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if first_guided:
            pipe._guidance_scale = settings.guidance if i + 1 >= first_guided else UNGUIDED
        if on_step is not None:
            on_step()
        return {}

    parameters = set(inspect.signature(type(pipe).__call__).parameters)
    if (on_step is not None or first_guided) and "callback_on_step_end" in parameters:
        extra["callback_on_step_end"] = after_step
    elif on_step is not None and "callback" in parameters:  # PixArt's older per-step callback
        extra["callback"], extra["callback_steps"] = lambda i, t, latents: on_step(), 1
    if settings.negative_prompt is not None:
        extra["negative_prompt"] = [settings.negative_prompt] * len(prompts)
    output = pipe(
        prompts,
        height=size[0],
        width=size[1],
        num_inference_steps=settings.steps,
        guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
        **extra,
    )
    return [to_uint8(image) for image in output.images]


def generate(pipe: Any, prompts: list[str], seeds: list[int], size: tuple[int, int], settings: SampleSettings,
             batch_size: int = 8, on_step: StepCallback = None) -> list[np.ndarray]:  # fmt: skip
    """:func:`pipeline_images` in batches of ``batch_size``."""
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        images += pipeline_images(pipe, prompts[chunk], seeds[chunk], size, settings, on_step)
    return images


def denoising_steps(prompts: int, settings: SampleSettings, batch_size: int = 8) -> int:
    """How many denoising steps :func:`generate` runs (for progress totals)."""
    return math.ceil(prompts / batch_size) * settings.steps


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:05d}-s{seed}.png"


def save_png(image: np.ndarray, path: Path, metadata: dict[str, Any]) -> None:
    """PNG with every generation setting in its text chunks."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, pnginfo=info)


@dataclass
class SampleReport:
    out: str
    model: str
    adapter: str | None
    system: str
    scheduler: str
    height: int
    width: int
    settings: dict[str, Any]
    images: list[dict[str, Any]] = field(default_factory=list)
    grid: str | None = None
    vae_tiling: bool = False  # tiled VAE decoding (the image is larger than the VAE's native size)
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None  # what peak_memory_bytes counts (see runtime.PeakMemory)


def sample(
    model: str,
    prompts: list[str],
    seeds: list[int],
    out: str | Path,
    settings: SampleSettings,
    *,
    adapter: str | Path | None = None,
    compare: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 4,
    show_progress: bool = True,
) -> SampleReport | None:
    """Write one PNG per (prompt, seed) to ``out`` (and to ``out/original`` with ``compare``), and a grid.

    Returns the report on the main process (None on the others of a multi-process run)."""
    from accelerate import PartialState

    if not prompts:
        raise DeltaConvError("no prompts given")
    settings.check()
    check_seeds(seeds)
    check_batch_size(batch_size)
    check_output_folder(Path(out))
    settings.check_model(model)
    settings = settings.for_model(model)
    state = PartialState()
    loaded = load_for_sampling(model, adapter, device or str(state.device), dtype)
    if compare and loaded.adapter is None:
        raise DeltaConvError(
            "--compare needs a ΔConv adapter: this model has none, so it already is the original"
        )
    size = resolve_size(loaded, settings.height, settings.width)
    tiled = use_tiled_vae(loaded.pipe, size)
    scheduler = set_scheduler(loaded.pipe, settings.scheduler)
    out = Path(out)
    jobs = [(i, prompt, seed) for i, prompt in enumerate(prompts) for seed in seeds]
    systems = [loaded.system, "original"] if compare else [loaded.system]
    base = {"model": loaded.model, "adapter": loaded.adapter_path, "steps": settings.steps,
            "guidance": settings.guidance, "scheduler": scheduler, "height": size[0], "width": size[1],
            "negative_prompt": settings.negative_prompt, "guidance_rescale": settings.guidance_rescale,
            "guidance_start": settings.guidance_start, "deltaconv": __version__}  # fmt: skip
    with (
        state.split_between_processes(jobs) as mine,
        progress_bar(not show_progress or not state.is_main_process) as bar,
        PeakMemory(denoiser_of(loaded.pipe).device) as peak,
    ):
        batches = math.ceil(len(mine) / batch_size)
        task = bar.add_task("sampling", total=batches * len(systems) * settings.steps, status="")
        for number, start in enumerate(range(0, len(mine), batch_size), start=1):
            chunk = mine[start : start + batch_size]
            for system in systems:
                bypass = compare and system == "original"  # a plain model has no adapter to bypass
                status = f"{system}, batch {number}/{batches} ({len(chunk)} images)"
                with loaded.adapter.bypassed() if bypass else nullcontext():
                    images = pipeline_images(
                        loaded.pipe, [p for _, p, _ in chunk], [s for _, _, s in chunk], size, settings,
                        on_step=lambda status=status: advance(bar, task, status),
                    )  # fmt: skip
                folder = out / "original" if system == "original" and compare else out
                for (index, prompt, seed), image in zip(chunk, images, strict=True):
                    adapter_used = None if system == "original" else loaded.adapter_path
                    metadata = {**base, "adapter": adapter_used, "system": system, "prompt": prompt}
                    save_png(image, folder / image_name(index, seed), {**metadata, "seed": seed})
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    report = SampleReport(str(out), loaded.model, loaded.adapter_path, loaded.system, scheduler, *size,
                          asdict(settings), vae_tiling=tiled, peak_memory_bytes=peak.bytes,
                          peak_memory_kind=peak.what)  # fmt: skip
    report.images = [
        {"prompt_index": i, "prompt": p, "seed": s, "file": image_name(i, s)} for i, p, s in jobs
    ]
    report.grid = str(out / "grid.png")
    _write_grid(out, prompts, seeds, compare, loaded.system, Path(report.grid))
    (out / "samples.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _write_grid(
    out: Path, prompts: list[str], seeds: list[int], compare: bool, system: str, path: Path
) -> None:
    """Rows: the first 16 prompts; columns: the first 8 seeds (original | ΔConv side by side with compare)."""
    rows, labels = [], []
    shown_seeds = seeds[:8]
    for index, prompt in enumerate(prompts[:16]):
        row = []
        for seed in shown_seeds:
            if compare:
                row.append(np.asarray(Image.open(out / "original" / image_name(index, seed)).convert("RGB")))
            row.append(np.asarray(Image.open(out / image_name(index, seed)).convert("RGB")))
        rows.append(row)
        labels.append(prompt)
    columns = [
        f"{name} s{seed}" for seed in shown_seeds for name in (["original", system] if compare else [system])
    ]
    height = rows[0][0].shape[0]
    save_grid(rows, path, columns, labels, scale=max(1, 128 // height))
