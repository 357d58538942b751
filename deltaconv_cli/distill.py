"""``deltaconv distill``: distillation of the new blocks from the teacher (docs/method.md §1.3).

The teacher is the original model; the student is the same model with the blocks mounted, so one copy
of the weights serves both (the teacher view is ``adapter.bypassed()``). Per step and sample: encode the
image, draw t uniformly and noise, run teacher (no grad) and student on the same noisy latents, timestep
and text condition, and minimise

    w_d MSE(student, target) + w_t MSE(student, teacher) + w_f sum_blocks MSE(student feat., teacher feat.)

with target the noise, the velocity or the sample as the scheduler's prediction type says, and the
feature the residual stream right after each replaced sub-block (ΔConv), or the attention output
(LinFusion's own recipe). Only the blocks train and only they are saved.

Every random draw of a sample (timestep, noise, posterior noise, caption dropout) comes from a generator
seeded by (seed, step, sample index), and the samples of a step are fixed by the step number. So a run
split over K processes (each takes 1/K of the global batch), and a run resumed from a checkpoint, follow
the same trajectory as one uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.resources
import importlib.util
import itertools
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from .architectures import denoiser_of, family_for, latent_size, latent_stride
from .block import GATES
from .conditioning import encode_prompts, latent_posterior, predict
from .data import DEMO, batch_indices, image_tensor, open_data
from .errors import DeltaConvError, first_line
from .files import atomic_path, load_optimizer_tensors, optimizer_tensors
from .interop import adapter_for
from .loading import load_model, locate_model, locate_pipeline, model_name_or_path
from .mixers import INITS, MIXERS
from .progress import advance, progress_bar
from .runtime import check_output_folder
from .sampling import SampleSettings
from .surgery import DeltaConvAdapter, ReplacedSelfAttention

RECIPES_DIR = Path(str(importlib.resources.files("deltaconv_cli.recipes")))
FEATURES = ("residual", "attention_output")  # ΔConvFusion's feature target, LinFusion's
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType)
REPORT_TO = ("none", "tensorboard")


@dataclass
class DistillConfig:
    """Every setting of a distillation run; recipes and command-line options fill it."""

    steps: int = 1000
    mixer: str = "deltaconv"
    # LinFusion only: feature MLPs of width C // mid_dim_scale (LinFusion's --mid_dim_scale; 16 for
    # LinFusion-XL), -1 for none; new blocks only (imported ones keep their widths).
    mid_dim_scale: int = 1
    kernel_sizes: int | dict[str, int] | None = None
    gate: str = "scaled"
    init: str = "teacher"  # new blocks start from the attention ("teacher") or randomly (the paper)
    calibration_samples: int = 32  # with init "teacher": images the start is fitted on (0: no fit)
    calibration_timesteps: int = 8
    resolution: int = 512
    batch_size: int = 16  # global batch per micro-step, split across processes
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    weight_decay: float = 0.03
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    caption_dropout: float = 0.15
    denoise_weight: float = 1.0
    teacher_weight: float = 1.0
    feature_weight: float = 0.001
    feature: str = "residual"  # "residual" (ΔConvFusion) or "attention_output" (LinFusion)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0
    gradient_checkpointing: bool = False
    report_prompts: int = 8
    report_steps: int = 20
    report_guidance: float | None = None  # default: the model's own (SampleSettings.for_model)
    report_guidance_start: float | None = None  # default: the model's own (SampleSettings.for_model)
    report_to: str = "none"  # "tensorboard": losses also go to accelerate's TensorBoard tracker

    def check(self) -> None:
        """A clear one-line error for the first setting no run can use (before any model is loaded)."""
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps <= 0:
            raise DeltaConvError(f"--steps must be a positive number, got {self.steps}")
        for name, (kind, allowed, description) in _SETTING_RULES.items():
            value = getattr(self, name)
            wrong_type = not isinstance(value, kind) or isinstance(value, bool) and bool not in kind
            if wrong_type or not allowed(value):
                raise DeltaConvError(f"setting {name} must be {description}, got {value!r}")
        if self.mid_dim_scale != 1 and self.mixer != "linfusion":
            raise DeltaConvError(
                f"setting mid_dim_scale sets LinFusion's feature MLPs; {self.mixer} has none"
            )
        sizes = self.kernel_sizes
        values = [sizes] if isinstance(sizes, int) else list((sizes or {}).values())
        if not isinstance(sizes, int | dict | None) or any(
            not isinstance(k, int) or k < 1 or k % 2 == 0 for k in values
        ):
            raise DeltaConvError(f"kernel sizes must be positive odd numbers, got {sizes!r}")

    def report_sampling(self) -> SampleSettings:
        """How the end-of-run report samples teacher and students."""
        return SampleSettings(
            self.report_steps, self.report_guidance, guidance_start=self.report_guidance_start
        )

    # Settings that change the training trajectory; a resumed run must agree on them.
    def trajectory(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("steps", "checkpoint_every", "keep_checkpoints", "num_workers", "report_prompts",
                    "report_steps", "report_guidance", "report_guidance_start", "report_to"):  # fmt: skip
            data.pop(key)
        return data


SETTING_NAMES = frozenset(f.name for f in fields(DistillConfig))
# Settings added after run folders were first written: a folder without one ran with this value.
SETTINGS_ADDED_LATER = {"mid_dim_scale": 1}


def _finite(low: float, high: float = math.inf, *, open_low: bool = False) -> Callable[[Any], bool]:
    return lambda v: math.isfinite(v) and (v > low if open_low else v >= low) and v <= high


_COUNT = (int,)
_NUMBER = (int, float)
# name -> (accepted types, rule, what the setting must be); `steps` and `kernel_sizes` are checked apart.
_SETTING_RULES: dict[str, tuple[tuple[type, ...], Callable[[Any], bool], str]] = {
    "mixer": ((str,), lambda v: v in MIXERS, f"one of {', '.join(MIXERS)}"),
    "mid_dim_scale": (_COUNT, lambda v: v >= 1 or v == -1, "a whole number >= 1, or -1 (no feature MLP)"),
    "gate": ((str,), lambda v: v in GATES, f"one of {', '.join(GATES)}"),
    "init": ((str,), lambda v: v in INITS, f"one of {', '.join(INITS)}"),
    "calibration_samples": (_COUNT, lambda v: v >= 0, "a number of images >= 0"),
    "calibration_timesteps": (_COUNT, lambda v: v >= 1, "at least 1"),
    "resolution": (_COUNT, lambda v: v > 0, "a positive number of pixels"),
    "batch_size": (_COUNT, lambda v: v >= 1, "at least 1"),
    "gradient_accumulation_steps": (_COUNT, lambda v: v >= 1, "at least 1"),
    "learning_rate": (_NUMBER, _finite(0, open_low=True), "a positive number"),
    "adam_beta1": (_NUMBER, _finite(0, 0.999999), "in [0, 1)"),
    "adam_beta2": (_NUMBER, _finite(0, 0.999999), "in [0, 1)"),
    "weight_decay": (_NUMBER, _finite(0), "a number >= 0"),
    "lr_scheduler": ((str,), lambda v: v in LR_SCHEDULERS, f"one of {', '.join(LR_SCHEDULERS)}"),
    "warmup_steps": (_COUNT, lambda v: v >= 0, "a number of steps >= 0"),
    "max_grad_norm": (_NUMBER, _finite(0, open_low=True), "a positive number"),
    "mixed_precision": ((str,), lambda v: v in ("no", "fp16", "bf16"), "no, fp16 or bf16"),
    "caption_dropout": (_NUMBER, _finite(0, 1), "a probability in [0, 1]"),
    "denoise_weight": (_NUMBER, _finite(0), "a number >= 0"),
    "teacher_weight": (_NUMBER, _finite(0), "a number >= 0"),
    "feature_weight": (_NUMBER, _finite(0), "a number >= 0"),
    "feature": ((str,), lambda v: v in FEATURES, f"one of {', '.join(FEATURES)}"),
    "checkpoint_every": (_COUNT, lambda v: v >= 1, "a number of steps >= 1"),
    "keep_checkpoints": (_COUNT, lambda v: v >= 1, "at least 1"),
    "seed": (_COUNT, lambda v: v >= 0, "a number >= 0"),
    "num_workers": (_COUNT, lambda v: v >= 0, "a number >= 0"),
    "gradient_checkpointing": ((bool,), lambda v: True, "true or false"),
    "report_prompts": (_COUNT, lambda v: v >= 1, "at least 1"),
    "report_steps": (_COUNT, lambda v: v >= 1, "at least 1"),
    "report_guidance": ((*_NUMBER, type(None)), lambda v: v is None or _finite(0)(v), "a number >= 0"),
    "report_guidance_start": ((*_NUMBER, type(None)), lambda v: v is None or 0 <= v <= 1, "in [0, 1]"),
    "report_to": ((str,), lambda v: v in REPORT_TO, f"one of {', '.join(REPORT_TO)}"),
}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def load_recipe(name: str | Path, mixer: str = "deltaconv") -> dict[str, Any]:
    """Settings of a recipe (a name from ``recipes/`` or a JSON file), with its ``linfusion`` section
    applied when ``mixer`` is LinFusion (its own loss weights and learning rate)."""
    path = Path(name)
    if not path.is_file():
        path = RECIPES_DIR / f"{name}.json"
    if not path.is_file():
        raise DeltaConvError(f"unknown recipe {name!r}; built-in recipes: {', '.join(recipe_names())}")
    try:
        recipe = json.loads(path.read_text())
    except ValueError as err:
        raise DeltaConvError(f"recipe {path} is not valid JSON: {err}") from None
    recipe.pop("description", None)
    overrides = recipe.pop("linfusion", {})
    if mixer == "linfusion":
        recipe.update(overrides)
    recipe["mixer"] = mixer
    unknown = sorted(set(recipe) - SETTING_NAMES)
    if unknown:
        raise DeltaConvError(f"recipe {path} has unknown settings: {', '.join(unknown)}")
    return recipe


def make_config(recipe: str | Path, mixer: str = "deltaconv", **overrides: Any) -> DistillConfig:
    """A recipe's settings with ``overrides`` (None means: keep the recipe's value) on top."""
    settings = load_recipe(recipe, mixer)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    config = _settings(**settings)
    config.check()
    return config


def config_for(model: str, recipe: str | Path | None = None, mixer: str = "deltaconv",
               **overrides: Any) -> DistillConfig:  # fmt: skip
    """The settings of a run on ``model``: ``recipe`` (default: the model family's, ``demo`` for the
    embedded teacher) with ``overrides`` on top; checked before any model is loaded."""
    given = {k: v for k, v in overrides.items() if v is not None}
    _settings(mixer=mixer, **given).check()  # bad options fail before even the model's config is read
    if recipe is None and model == DEMO:
        recipe = "demo"
    elif recipe is None:
        recipe = family_for(locate_model(model, config_only=True).meta_denoiser()).default_recipe
    return make_config(recipe, mixer, **given)


def _settings(**settings: Any) -> DistillConfig:
    unknown = sorted(set(settings) - SETTING_NAMES)
    if unknown:
        raise DeltaConvError(f"unknown distill settings: {', '.join(unknown)}")
    return DistillConfig(**settings)


# ----------------------------------------------------------------------------------------------- objective


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of every random draw of sample ``index`` at micro-step ``step``."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class DistillationObjective(nn.Module):
    """Teacher and student forward passes of one micro-batch and the loss terms of docs/method.md §1.3."""

    def __init__(self, pipe: Any, adapter: DeltaConvAdapter, config: DistillConfig) -> None:
        super().__init__()
        self.denoiser = denoiser_of(pipe)
        self.adapter = adapter
        self.__dict__["pipe"] = pipe  # VAE and text encoders: used, frozen, not part of this module
        self.config = config
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self._features: list[torch.Tensor] = []
        self._hooks = []
        family = family_for(self.denoiser)
        for module in self.denoiser.modules():
            if not isinstance(module, ReplacedSelfAttention):
                continue
            if config.feature == "attention_output":
                self._hooks.append(module.register_forward_hook(lambda m, a, out: self._features.append(out)))
            else:
                block = self.denoiser.get_submodule(module.site_name.rsplit(".", 1)[0])
                tap = family.residual_tap(block)
                self._hooks.append(
                    tap.register_forward_pre_hook(lambda m, args: self._features.append(args[0]))
                )

    def _take_features(self) -> list[torch.Tensor]:
        features, self._features = self._features, []
        return features

    @torch.no_grad()
    def _inputs(self, images: torch.Tensor, captions: list[str], seeds: list[tuple[int, int, int]]):
        pipe, device = self.pipe, self.denoiser.device
        vae = pipe.vae
        posterior = latent_posterior(pipe, images)
        gens = [sample_generator(*s) for s in seeds]
        shape = posterior.mean.shape[1:]
        posterior_noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.tensor([int(torch.randint(steps, (1,), generator=g)) for g in gens], device=device)
        dropped = [float(torch.rand(1, generator=g)) < self.config.caption_dropout for g in gens]
        latents = (posterior.mean + posterior.std * posterior_noise).float() * vae.config.scaling_factor
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        prediction = self.noise_scheduler.config.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = latents
        prompts = ["" if drop else caption for drop, caption in zip(dropped, captions, strict=True)]
        cond = encode_prompts(pipe, prompts, images.shape[-2], images.shape[-1])
        return noisy.to(self.denoiser.dtype), t, cond, target

    def forward(self, images: torch.Tensor, captions: list[str], seeds: list[tuple[int, int, int]]):
        noisy, t, cond, target = self._inputs(images, captions, seeds)
        self._take_features()
        with torch.no_grad(), self.adapter.bypassed():
            teacher = predict(self.denoiser, noisy, t, cond).float()
            teacher_features = [f.detach().float() for f in self._take_features()]
        student = predict(self.denoiser, noisy, t, cond).float()
        student_features = [f.float() for f in self._take_features()]
        terms = {
            "denoise": F.mse_loss(student, target.float()),
            "teacher": F.mse_loss(student, teacher),
            "feature": sum(
                (F.mse_loss(s, t) for s, t in zip(student_features, teacher_features, strict=True)),
                start=student.new_zeros(()),
            ),
        }
        c = self.config
        terms["total"] = c.denoise_weight * terms["denoise"] + c.teacher_weight * terms["teacher"]
        terms["total"] = terms["total"] + c.feature_weight * terms["feature"]
        return terms


# ----------------------------------------------------------------------------------------------- checkpoints


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*[0-9]"))


def save_checkpoint(out: Path, step: int, adapter: DeltaConvAdapter, optimizer: Any, scheduler: Any) -> Path:
    """Write checkpoint ``step`` atomically (temp folder + rename): adapter and optimizer tensors as
    safetensors, the rest as JSON."""
    final = out / "checkpoints" / f"step-{step:07d}"
    with atomic_path(final) as staging:
        adapter.save_pretrained(staging / "adapter")
        tensors, param_groups = optimizer_tensors(optimizer)
        save_file(tensors, staging / "optimizer.safetensors")
        meta = {"step": step, "param_groups": param_groups, "scheduler": scheduler.state_dict()}
        (staging / "state.json").write_text(json.dumps(meta, indent=1))
    return final


def load_checkpoint(folder: Path, adapter: DeltaConvAdapter, optimizer: Any, scheduler: Any) -> int:
    meta = json.loads((folder / "state.json").read_text())
    weights = load_file(folder / "adapter" / SAFETENSORS_WEIGHTS_NAME)
    adapter.load_state_dict(weights)
    load_optimizer_tensors(optimizer, load_file(folder / "optimizer.safetensors"), meta["param_groups"])
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["step"])


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class DistillResult:
    out: Path
    steps_done: int
    adapter_path: Path
    report: dict[str, Any] | None


class NonFiniteLoss(DeltaConvError):
    pass


class UnreadableData(DeltaConvError):
    """A training sample that cannot be read (a damaged image): the run stops but keeps its progress."""


def distill(
    model: str,
    data: str,
    out: str | Path,
    config: DistillConfig,
    *,
    resume: bool = False,
    adapter: str | Path | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillResult:
    """Distil the blocks of ``model`` (a teacher pipeline, or a converted one) on ``data``; see module doc."""
    from accelerate import Accelerator

    out = Path(out)
    check_output_folder(out)
    report_sampling = config.report_sampling()
    report_sampling.check()
    report_sampling.check_model(model, "distill")
    report_sampling = report_sampling.for_model(model)
    config = replace(
        config, report_guidance=report_sampling.guidance, report_guidance_start=report_sampling.guidance_start
    )
    dataset = open_data(data, config.seed)
    if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise DeltaConvError("report_to tensorboard needs the tensorboard package: pip install tensorboard")
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        # The GPU recipes (sd15, sdxl) ask for fp16, which CPUs cannot train in: follow the device.
        _note("fp16 mixed precision needs a GPU: this CPU run trains in fp32 (bf16 also works on CPUs)")
        config = replace(config, mixed_precision="no")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=out,
    )
    if config.batch_size % accelerator.num_processes:
        raise DeltaConvError(
            f"batch size {config.batch_size} does not split over {accelerator.num_processes} processes"
        )
    checkpoints = _checkpoints(out)
    if resume and not checkpoints:
        raise DeltaConvError(f"nothing to resume: {out} holds no checkpoint")
    if not resume and out.exists() and any(out.iterdir()):
        raise DeltaConvError(
            f"{out} already holds a run; pass --resume to continue it or choose another folder"
        )
    settings = {"model": str(model), "data": str(data), **config.trajectory()}
    if adapter is not None and config.mid_dim_scale != 1:
        raise DeltaConvError("setting mid_dim_scale builds new LinFusion blocks; --adapter brings its own")
    if resume:
        saved = _read_run_config(out)
        saved_settings = {k: saved.get(k, SETTINGS_ADDED_LATER.get(k)) for k in settings}
        differences = [
            f"{k}: {saved_settings[k]!r} then, {v!r} now"
            for k, v in settings.items()
            if saved_settings[k] != v
        ]
        if differences:
            raise DeltaConvError(f"--resume with different settings ({'; '.join(differences)})")

    folder = locate_pipeline(model, "distill")
    # Before loading: diffusers' UNet follows odd latent sizes through its upsampling, so a size the model
    # cannot sample would otherwise train without a word.
    stride = latent_stride(folder.meta_denoiser())
    latent_size(config.resolution, config.resolution, folder.vae_factor, stride)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        config.mixed_precision
    ]
    pipe = load_model(folder, torch_dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():  # VAE and text encoders frozen; mount freezes the denoiser
        if isinstance(component, nn.Module):
            component.requires_grad_(False)
    blocks, new = _starting_adapter(pipe, folder, adapter, config, model_name_or_path(model, folder))
    blocks.mount(pipe, dtype=torch.float32)
    pipe.to(accelerator.device)
    fit_start = config.init == "teacher" and config.mixer == "deltaconv" and config.calibration_samples > 0
    if new and not resume and fit_start:
        from .calibration import calibrate

        with _status(show_progress and accelerator.is_main_process) as update:
            fit = calibrate(pipe, blocks, data, config.resolution, samples=config.calibration_samples,
                            timesteps=config.calibration_timesteps, seed=config.seed,
                            on_progress=update)  # fmt: skip
        _note(f"fitted the new blocks to the teacher's attention on {fit.samples} images at "
              f"{len(fit.timesteps)} timesteps in {fit.seconds:.0f} s ({fit.summary()})")  # fmt: skip
    initial_state = copy.deepcopy(blocks.state_dict())
    if config.gradient_checkpointing:
        denoiser_of(pipe).enable_gradient_checkpointing()
    denoiser_of(pipe).eval()

    objective = DistillationObjective(pipe, blocks, config)
    optimizer = torch.optim.AdamW(
        blocks.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    start, resumed_from = 0, None
    if resume:
        resumed_from, start = _load_newest_intact(checkpoints, blocks, optimizer, scheduler)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    batches = _micro_batches(dataset, config, start, accelerator)
    # The run folder is made only once the first batch has been read: bad data leaves nothing behind.
    first = next(batches)
    created = not resume and accelerator.is_main_process
    if created:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**settings, **asdict(config)}, indent=2) + "\n")
    run = TrainingRun(accelerator, objective, blocks, optimizer, scheduler, config, out,
                      start, itertools.chain([first], batches))  # fmt: skip
    try:
        with _trackers(accelerator, config, out, settings):
            steps_done = run.train(show_progress, on_step)
    except BaseException:
        if created and not _checkpoints(out):  # nothing worth keeping: no half-made run either
            shutil.rmtree(out, ignore_errors=True)
        raise
    report = None
    if accelerator.is_main_process:
        blocks.save_pretrained(out / "adapter")
        plot_losses(out / "log.jsonl", out / "loss.png")
        report = teacher_student_report(pipe, blocks, initial_state, data, config, out, show_progress)
        report["resumed_from"] = str(resumed_from) if resumed_from else None
        if steps_done < config.warmup_steps:
            report["note"] = (
                f"the learning rate was still warming up ({steps_done} of {config.warmup_steps} warm-up "
                f"steps, now {scheduler.get_last_lr()[0]:.3g}): the distilled blocks have barely moved"
            )
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return DistillResult(out, steps_done, out / "adapter", report)


@contextlib.contextmanager
def _status(show: bool) -> Iterator[Callable[[str], None]]:
    """A one-line status on stderr for work with no natural step count; yields its update function."""
    if not show:
        yield lambda message: None
        return
    with Console(stderr=True).status("", spinner="dots") as status:
        yield status.update


def _note(message: str) -> None:
    """A line on stderr about a choice the run made for the user."""
    Console(stderr=True).print(f"note: {message}", highlight=False, soft_wrap=True)


def _read_run_config(out: Path) -> dict[str, Any]:
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise DeltaConvError(f"cannot resume: {out / 'config.json'} is missing or damaged ({err})") from None
    if not isinstance(saved, dict):
        raise DeltaConvError(f"cannot resume: {out / 'config.json'} does not hold a JSON object")
    return saved


def _load_newest_intact(checkpoints: list[Path], adapter: DeltaConvAdapter, optimizer: Any,
                        scheduler: Any) -> tuple[Path, int]:  # fmt: skip
    """Load the newest checkpoint that reads back whole; say which damaged ones were passed over."""
    damaged = []
    for folder in reversed(checkpoints):
        try:
            step = load_checkpoint(folder, adapter, optimizer, scheduler)
        except Exception as err:  # json, safetensors and torch raise several types for damaged files
            damaged.append(f"{folder.name} ({first_line(err, 120)})")
            continue
        if damaged:
            _note(f"skipped damaged checkpoint(s) {', '.join(damaged)}; resuming from {folder.name}")
        return folder, step
    raise DeltaConvError(f"no intact checkpoint to resume from: {'; '.join(damaged)}")


@contextlib.contextmanager
def _trackers(accelerator: Any, config: DistillConfig, out: Path, settings: dict[str, Any]) -> Iterator[None]:
    """accelerate's experiment trackers (TensorBoard in OUT/tensorboard) when the run asks for them."""
    if config.report_to == "none":
        yield
        return
    accelerator.init_trackers("tensorboard", config={k: v for k, v in settings.items()
                                                     if isinstance(v, int | float | str | bool)})  # fmt: skip
    try:
        yield
    finally:
        accelerator.end_training()


def _starting_adapter(
    pipe: Any, folder: Any, adapter: str | Path | None, config: DistillConfig, base_model: str
) -> tuple[DeltaConvAdapter, bool]:
    """A given adapter, the converted folder's own, or new blocks built with the run's settings and
    ``base_model`` recorded (then the second value is True)."""
    if adapter is not None or (folder.is_converted and config.mixer == "deltaconv"):
        blocks = adapter_for(adapter if adapter is not None else folder.adapter_path, pipe)
        if blocks.config.mixer != config.mixer:
            raise DeltaConvError(
                f"the adapter holds {blocks.config.mixer} blocks, the run asks for {config.mixer}"
            )
        blocks.check_matches(pipe)
        return blocks, False
    blocks = DeltaConvAdapter.construct_for(
        pipe, config.kernel_sizes, mixer=config.mixer, gate=config.gate, seed=config.seed, init=config.init,
        mid_dim_scale=config.mid_dim_scale, base_model_name_or_path=base_model,
    )  # fmt: skip
    return blocks, True


class MicroBatches(torch.utils.data.Dataset):
    """This process's share of each micro-batch, addressed by micro-step: a DataLoader can prepare them
    in ``num_workers`` worker processes, and a resumed run starts at any step."""

    def __init__(self, dataset: Any, config: DistillConfig, rank: int, world: int) -> None:
        self.dataset, self.config = dataset, config
        share = config.batch_size // world
        self.mine = list(range(rank * share, (rank + 1) * share))  # positions within the global batch

    def __len__(self) -> int:
        return self.config.steps * self.config.gradient_accumulation_steps

    def __getitem__(
        self, micro_step: int
    ) -> tuple[torch.Tensor, list[str], list[tuple[int, int, int]]] | UnreadableData:
        config = self.config
        indices = batch_indices(micro_step, config.batch_size, len(self.dataset), config.seed)
        try:
            samples = [self.dataset[indices[i]] for i in self.mine]
        except DeltaConvError as err:
            # Raised in a worker process, it would reach the user inside a traceback: hand it over as a value.
            return UnreadableData(str(err))
        images = torch.stack([image_tensor(s.image, config.resolution) for s in samples])
        return images, [s.caption for s in samples], [(config.seed, micro_step, i) for i in self.mine]


def _micro_batches(dataset: Any, config: DistillConfig, start: int, accelerator: Any) -> Iterator[Any]:
    """This process's micro-batches from step ``start`` on, prepared by a DataLoader."""
    accumulation = config.gradient_accumulation_steps
    micro_batches = MicroBatches(dataset, config, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        micro_batches,
        batch_size=None,
        sampler=range(start * accumulation, config.steps * accumulation),
        num_workers=config.num_workers,
    )
    for micro_batch in loader:
        if isinstance(micro_batch, UnreadableData):
            raise micro_batch
        yield micro_batch


@dataclass
class TrainingRun:
    """The state of the optimisation loop: what trains, how, where it is written, and where it stands."""

    accelerator: Any
    objective: nn.Module
    adapter: DeltaConvAdapter
    optimizer: Any
    scheduler: Any
    config: DistillConfig
    out: Path
    step: int
    batches: Iterator[Any]

    def train(self, show_progress: bool, on_step: Callable[[int, dict[str, float]], None] | None) -> int:
        """Optimise from ``step`` to ``config.steps``; returns the number of steps done."""
        accelerator, config = self.accelerator, self.config
        start = self.step
        written = _checkpoints(self.out)
        last_good = written[-1] if written else None
        with progress_bar(disable=not (show_progress and accelerator.is_main_process)) as progress:
            task = progress.add_task("distilling", total=config.steps, completed=start, status="")
            try:
                while self.step < config.steps:
                    began = time.perf_counter()
                    terms = self._accumulate_gradients()
                    _stop_if_not_finite(terms, self.step + 1, last_good, self.out)
                    grad_norm = accelerator.clip_grad_norm_(self.adapter.parameters(), config.max_grad_norm)
                    self.optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    record = {"step": self.step, **terms, "grad_norm": float(grad_norm),
                              "lr": self.scheduler.get_last_lr()[0]}  # fmt: skip
                    record["seconds"] = time.perf_counter() - began
                    self._log(record)
                    shown = ("total", "denoise", "teacher", "feature")
                    advance(progress, task, " ".join(f"{k} {terms[k]:.4g}" for k in shown))
                    if on_step is not None:
                        on_step(self.step, terms)
                    if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                        last_good = self._save()
            except (KeyboardInterrupt, UnreadableData) as err:
                why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{err}; stopped"
                # One process of several cannot save alone: the others wait for it elsewhere.
                single = accelerator.num_processes == 1
                saved = self._save() if self.step > start and single else last_good
                if saved is None:
                    raise DeltaConvError(f"{why} at step {self.step}, before any checkpoint") from None
                message = f"{why} at step {self.step}; saved {saved}; continue with --resume"
                raise DeltaConvError(message) from None
        return self.step

    def _log(self, record: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with (self.out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.config.report_to != "none":
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def _accumulate_gradients(self) -> dict[str, float]:
        """Backward passes of the step's micro-batches; loss terms averaged over them and all processes."""
        accelerator, accumulation = self.accelerator, self.config.gradient_accumulation_steps
        terms: dict[str, float] = {}
        for micro in range(accumulation):
            batch = next(self.batches)
            last = micro == accumulation - 1
            with nullcontext() if last else accelerator.no_sync(self.objective):
                values = _guard_memory(partial(self.objective, *batch), self.config)
                accelerator.backward(values["total"] / accumulation)
            names = sorted(values)
            stacked = torch.stack([values[k].detach() for k in names]).unsqueeze(0)
            gathered = accelerator.gather(stacked).mean(0)
            for name, value in zip(names, gathered.tolist(), strict=True):
                terms[name] = terms.get(name, 0.0) + value / accumulation
        return terms

    def _save(self) -> Path:
        folder = self.out / "checkpoints" / f"step-{self.step:07d}"
        if self.accelerator.is_main_process:
            folder = save_checkpoint(self.out, self.step, self.adapter, self.optimizer, self.scheduler)
            for old in _checkpoints(self.out)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return folder


def _stop_if_not_finite(terms: dict[str, float], step: int, last_good: Path | None, out: Path) -> None:
    bad = [k for k in ("denoise", "teacher", "feature", "total") if not math.isfinite(terms[k])]
    if not bad:
        return
    if last_good is None:
        kept = "no checkpoint was written yet"
    else:
        kept = f"the last good checkpoint is {last_good}" + _divergence_note(last_good, out)
    raise NonFiniteLoss(f"loss term {bad[0]!r} is {terms[bad[0]]} at step {step}; stopped, {kept}")


def _divergence_note(checkpoint: Path, out: Path) -> str:
    """How the run looked when ``checkpoint`` was written: its loss against the run's median, and its
    largest weight, so a user can tell whether it already held diverging weights."""
    step = int(checkpoint.name.split("-")[1])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["total"] for r in records if math.isfinite(r["total"])]
    at_save = next((r["total"] for r in records if r["step"] == step), None)
    weights = load_file(checkpoint / "adapter" / SAFETENSORS_WEIGHTS_NAME)
    largest = max((float(t.abs().max()) for t in weights.values()), default=0.0)
    if at_save is None or not losses:
        return f" (largest weight {largest:.3g})"
    median = statistics.median(losses)
    note = f" (its loss {at_save:.4g}, the run's median {median:.4g}; largest weight {largest:.3g})"
    if at_save > 4 * median or largest > 1e3:
        note += "; it may already hold diverging weights: resume from it with a lower --learning-rate"
    return note


def _guard_memory(run: Callable[[], Any], config: DistillConfig) -> Any:
    try:
        return run()
    except torch.OutOfMemoryError:
        raise DeltaConvError(
            f"out of memory at batch size {config.batch_size}: lower --batch-size and raise "
            "--gradient-accumulation-steps by the same factor (same effective batch), or use "
            "--gradient-checkpointing"
        ) from None


# ----------------------------------------------------------------------------------------------- report


def smoothed(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start): the trend under per-step noise."""
    sums = np.cumsum(np.asarray(values, dtype=np.float64))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    shifted = np.concatenate([np.zeros(window), sums])[: len(values)]
    return (sums - shifted) / counts


def plot_losses(log: Path, path: Path) -> None:
    """PNG of every loss term against the step (log scale): raw values faint, a trailing mean over
    about a twentieth of the run drawn over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    window = max(1, len(records) // 20)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("total", "denoise", "teacher", "feature"):
        values = [r[key] for r in records]
        (raw,) = ax.plot(steps, values, lw=0.6, alpha=0.3)
        ax.plot(steps, smoothed(values, window), color=raw.get_color(), lw=1.6, label=key)
    ax.set(yscale="log", xlabel="step", ylabel="loss", title=f"distillation losses (mean of {window} steps)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def teacher_student_report(
    pipe: Any,
    adapter: DeltaConvAdapter,
    initial_state: dict[str, torch.Tensor],
    data: str,
    config: DistillConfig,
    out: Path,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Teacher vs freshly converted student vs distilled student on fixed prompts and seeds: a grid PNG
    and agreement numbers (image PSNR/SSIM, denoiser relative error; prompt adherence on the demo);
    distill writes the numbers to ``report.json``."""
    from .evaluation import agreement_run
    from .sampling import denoising_steps

    prompts = report_prompts(data, config)
    trained_state = copy.deepcopy(adapter.state_dict())
    steps = 4 * denoising_steps(len(prompts), config.report_sampling())
    with progress_bar(disable=not show_progress) as progress:
        task = progress.add_task("report: teacher vs converted vs distilled", total=steps, status="")
        runs = {}
        for name, state in (("converted", initial_state), ("distilled", trained_state)):
            adapter.load_state_dict(state)
            runs[name] = agreement_run(
                pipe, adapter, prompts, config.resolution, config.report_sampling(),
                on_step=lambda name=name: advance(progress, task, name),
            )  # fmt: skip
    initial, trained = runs["converted"], runs["distilled"]
    report: dict[str, Any] = {"prompts": prompts, "seeds": list(range(len(prompts)))}
    for name, run in (("converted", initial), ("distilled", trained)):
        report[name] = {k: v for k, v in run.items() if k not in ("teacher_images", "student_images")}
    from .imaging import save_grid

    scale = max(1, 192 // config.resolution)
    rows = [
        [t, i, d]
        for t, i, d in zip(
            trained["teacher_images"], initial["student_images"], trained["student_images"], strict=True
        )
    ]
    save_grid(rows, out / "report.png", ["teacher", "converted", "distilled"], prompts, scale=scale)
    return report


def report_prompts(data: str, config: DistillConfig) -> list[str]:
    """Prompts for the report: held-out demo scenes (a seed training never uses), or the first captions."""
    if data == DEMO:
        held_out = open_data(DEMO, config.seed + 1_000_003)
        return [held_out[i].caption for i in range(config.report_prompts)]
    dataset = open_data(data, config.seed)
    return [dataset.entries[i][1] for i in range(min(config.report_prompts, len(dataset)))]
