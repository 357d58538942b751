"""``deltaconv eval`` and teacher-student agreement: the original model, the ΔConv student and the
LinFusion student on the same prompts and seeds (FID with clean-fid, CLIP score, PSNR/SSIM against the
original, denoiser error along the trajectory, demo prompt adherence, time and memory per image)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from PIL import Image

from .architectures import denoiser_of
from .conditioning import use_tiled_vae
from .errors import DeltaConvError
from .imaging import psnr, save_grid, ssim
from .profile import time_systems
from .runtime import Timer, check_output_folder, check_seeds, read_text_file
from .sampling import (
    SampleSettings,
    StepCallback,
    check_batch_size,
    denoising_steps,
    generate,
    pipeline_images,
)
from .surgery import DeltaConvAdapter


class TrajectoryComparison:
    """While the teacher samples, also runs the student on the same denoiser inputs and records the
    relative error ||student - teacher|| / ||teacher|| at every denoiser call."""

    def __init__(self, adapter: DeltaConvAdapter) -> None:
        self.adapter = adapter
        self.errors: list[float] = []
        self._inside = False

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._inside:
            return
        self._inside = True
        try:
            with self.adapter.enabled():
                student = module(*args, **kwargs)
        finally:
            self._inside = False
        teacher = output[0] if isinstance(output, tuple) else output.sample
        student = student[0] if isinstance(student, tuple) else student.sample
        self.errors.append(float((student.float() - teacher.float()).norm() / teacher.float().norm()))


def agreement_run(pipe: Any, adapter: DeltaConvAdapter, prompts: list[str], resolution: int | tuple[int, int],
                  settings: SampleSettings, on_step: StepCallback = None) -> dict[str, Any]:  # fmt: skip
    """Teacher and student images for prompts with seeds 0..n-1, and how far apart they are
    (``2 * denoising_steps(len(prompts), ...)`` denoising steps, each reported to ``on_step``)."""
    size = (resolution, resolution) if isinstance(resolution, int) else resolution
    seeds = list(range(len(prompts)))
    comparison = TrajectoryComparison(adapter)
    handle = denoiser_of(pipe).register_forward_hook(comparison, with_kwargs=True)
    try:
        with adapter.bypassed():
            teacher = generate(pipe, prompts, seeds, size, settings, on_step=on_step)
    finally:
        handle.remove()
    student = generate(pipe, prompts, seeds, size, settings, on_step=on_step)
    result: dict[str, Any] = {
        "psnr_db": psnr(teacher, student),
        "ssim": ssim(teacher, student),
        "denoiser_relative_error": float(np.mean(comparison.errors)),
        "teacher_images": teacher,
        "student_images": student,
    }
    adherence = domain_adherence(prompts, teacher, student)
    if adherence is not None:
        result["teacher_adherence"], result["student_adherence"] = adherence
    return result


def domain_adherence(prompts: list[str], *image_sets: list[np.ndarray]) -> tuple[float, ...] | None:
    """Mean prompt adherence of each image set, when every prompt is a demo-domain caption."""
    from .demo import domain

    try:
        for prompt in prompts:
            domain.parse_caption(prompt)
    except ValueError:
        return None
    return tuple(
        float(np.mean([domain.check(image, prompt) for image, prompt in zip(images, prompts, strict=True)]))
        for images in image_sets
    )


# ----------------------------------------------------------------------------------------------- eval

FEATURES = ("inception", "domain")
INCEPTION_FILE = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid looks for its Inception weights
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)


class _DomainFeatures(torch.nn.Module):
    """The demo extractor in clean-fid's calling convention: images in [0, 255], features out."""

    def __init__(self) -> None:
        super().__init__()
        from .demo.extractor import DomainFeatureExtractor
        from .loading import demo_path

        self.extractor = DomainFeatureExtractor.from_pretrained(demo_path("extractor")).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.features(images / 255)


def folder_features(folder: Path, feature: str, device: torch.device) -> np.ndarray:
    """clean-fid features of every image in ``folder``: its Inception, or the demo domain's extractor."""
    from cleanfid.fid import build_feature_extractor, get_folder_features
    from cleanfid.resize import make_resizer

    if feature == "inception":
        model = build_feature_extractor("clean", device, use_dataparallel=False)
        return get_folder_features(
            str(folder), model, num_workers=0, device=device, mode="clean", verbose=False
        )
    if feature != "domain":
        raise DeltaConvError(f"feature must be inception or domain, got {feature!r}")
    resize = make_resizer("PIL", False, "bicubic", (64, 64))
    return get_folder_features(str(folder), _DomainFeatures().to(device), num_workers=0, device=device,
                               mode="clean", custom_fn_resize=resize, verbose=False)  # fmt: skip


def count_images(folder: Path) -> int:
    """The images in ``folder`` and below that clean-fid reads (by its extensions)."""
    from cleanfid.fid import EXTENSIONS

    return sum(1 for f in folder.rglob("*") if f.suffix[1:] in EXTENSIONS and f.is_file())


MIN_FID_IMAGES = 2  # a covariance needs two samples
FEW_FID_IMAGES = 200  # below this FID is dominated by its bias and noise (clean-fid uses 10k-50k)


@dataclass(frozen=True)
class FidPlan:
    """What FID eval computes, settled before any model is loaded."""

    reference: str | None
    feature: str
    skipped: dict[str, str]
    warnings: tuple[str, ...]

    @property
    def computed(self) -> bool:
        return "fid" not in self.skipped


def plan_fid(model: str, reference: str | None, feature: str | None, images: int,
             include_original: bool) -> FidPlan:  # fmt: skip
    """The FID reference and features for ``model``, or why FID is skipped; a clear error for a
    reference or features that cannot work, before anything is generated."""
    from .demo import DEMO

    demo = model == DEMO
    feature = feature or ("domain" if demo else "inception")
    if feature not in FEATURES:
        raise DeltaConvError(f"FID features must be {' or '.join(FEATURES)}, got {feature!r}")
    reference = reference or (DEMO if demo else None)
    warnings = []
    if reference is None:
        why = "no --reference given (a folder of real images, or 'original')"
        return FidPlan(None, feature, {"fid": why}, ())
    if reference == "original" and not include_original:
        raise DeltaConvError("--reference original needs the original model among the systems")
    if reference == DEMO and not demo:
        raise DeltaConvError("--reference demo holds the demo's scenes; it is a reference for the demo only")
    if reference not in ("original", DEMO):
        if not Path(reference).is_dir():
            raise DeltaConvError(f"reference folder {reference} not found")
        found = count_images(Path(reference))
        if found < MIN_FID_IMAGES:
            raise DeltaConvError(
                f"reference folder {reference} holds {found} images; FID needs at least {MIN_FID_IMAGES}"
            )
    if feature == "inception" and not INCEPTION_FILE.is_file():
        other = ", or use --feature domain" if demo else ""
        raise DeltaConvError(
            f"clean-fid's Inception weights are not on this machine: download {INCEPTION_URL} to "
            f"{INCEPTION_FILE}{other}, or leave out --reference to skip FID"
        )
    if feature == "domain" and not demo:
        warnings.append("domain features describe the demo's scenes only: FID on them says little here")
    if images < MIN_FID_IMAGES:
        why = f"{images} image per system; FID needs at least {MIN_FID_IMAGES}"
        return FidPlan(reference, feature, {"fid": why}, tuple(warnings))
    if images < FEW_FID_IMAGES:
        warnings.append(
            f"FID from {images} images per system is dominated by bias and noise; compare systems only "
            f"on the same prompts, and use {FEW_FID_IMAGES}+ images for a usable value"
        )
    return FidPlan(reference, feature, {}, tuple(warnings))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    from cleanfid.fid import fid_from_feats

    return float(fid_from_feats(features_a, features_b))


@dataclass
class EvalSettings:
    steps: int = 20
    guidance: float | None = None  # default: the model's recommended guidance
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    seed: int = 0  # prompt i uses seed + i
    batch_size: int = 8
    feature: str | None = None  # default: domain on the demo, inception otherwise
    clip_model: str | None = None
    trajectory_prompts: int = 8
    timing_rounds: int = 3  # timed rounds (systems in turns, after a warm-up round; medians)
    guidance_rescale: float = 0.0  # as SampleSettings.guidance_rescale
    guidance_start: float | None = None  # as SampleSettings.guidance_start

    def sampling(self) -> SampleSettings:
        """The settings every system samples with."""
        return SampleSettings(
            self.steps, self.guidance, self.height, self.width, self.scheduler,
            guidance_rescale=self.guidance_rescale, guidance_start=self.guidance_start,
        )  # fmt: skip

    def check(self) -> None:
        """A clear error for settings no model can use (checked before any model is loaded)."""
        self.sampling().check()
        check_batch_size(self.batch_size)
        if self.clip_model is not None and not Path(self.clip_model).is_dir():
            raise DeltaConvError(
                f"CLIP model folder {self.clip_model} not found (--clip takes a local folder)"
            )
        if self.trajectory_prompts < 0:
            raise DeltaConvError(f"trajectory prompts must be >= 0, got {self.trajectory_prompts}")
        if self.timing_rounds < 0:
            raise DeltaConvError(f"timing rounds must be >= 0, got {self.timing_rounds}")


@dataclass
class SystemResult:
    name: str
    adapter: str | None
    images: int
    reused: bool
    fid: float | None = None
    clip_score: float | None = None
    psnr_db: float | None = None  # vs the original, same prompts and seeds
    ssim: float | None = None
    denoiser_relative_error: float | None = None
    adherence: float | None = None
    seconds_per_image: float | None = None
    peak_memory_bytes: int | None = None


@dataclass
class EvalReport:
    model: str
    out: str
    prompts: int
    reference: str | None
    feature: str | None
    height: int
    width: int
    device: str
    dtype: str
    settings: dict[str, Any]
    systems: list[SystemResult] = field(default_factory=list)
    grid: str | None = None
    reference_fid_floor: float | None = None  # FID of reference vs itself split in halves
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    warnings: list[str] = field(default_factory=list)
    vae_tiling: bool = False  # tiled VAE decoding (images larger than the VAE's native size)
    timing: str | None = None  # how seconds_per_image was measured


def read_prompts(spec: str) -> tuple[list[str], str | None]:
    """``demo:N`` (N held-out demo captions; then the real renders are the reference) or a text file."""
    from .demo import DEMO
    from .demo.quality import held_out_captions

    if spec.startswith(f"{DEMO}:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            count = 0
        if count < 1:
            raise DeltaConvError(f"prompts {DEMO}:N takes a positive number of captions, got {spec!r}")
        return held_out_captions(count)[0], DEMO
    path = Path(spec)
    if not path.is_file():
        raise DeltaConvError(f"prompt file {spec} not found (or use {DEMO}:N for held-out demo captions)")
    prompts = [line.strip() for line in read_text_file(path).splitlines() if line.strip()]
    if not prompts:
        raise DeltaConvError(f"prompt file {spec} holds no prompts")
    return prompts, None


def _fingerprint(settings: dict[str, Any], adapter: str | None) -> dict[str, Any]:
    digest = None
    if adapter is not None:  # an adapter folder, a LinFusion folder or a ConvFusion file
        from .interop import locate_weights

        weights = locate_weights(adapter)
        weights = weights if weights.is_file() else weights / SAFETENSORS_WEIGHTS_NAME
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return {**settings, "adapter": adapter, "adapter_sha256": digest}


def _cached(folder: Path, fingerprint: dict[str, Any], count: int) -> bool:
    try:  # a marker cut short (a run killed while writing it) means: generate again
        recorded = json.loads((folder / "settings.json").read_text())
    except (OSError, ValueError):
        return False
    return recorded == json.loads(json.dumps(fingerprint)) and all(
        (folder / f"{i:05d}.png").is_file() for i in range(count)
    )


def _load_images(folder: Path, count: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / f"{i:05d}.png").convert("RGB")) for i in range(count)]


def evaluate(
    model: str,
    prompts: list[str],
    out: str | Path,
    settings: EvalSettings,
    *,
    adapter: str | Path | None = None,
    linfusion_adapter: str | Path | None = None,
    include_original: bool = True,
    reference: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Generate the prompts with each system (reusing images whose settings match) and compare them."""
    from .interop import adapter_for
    from .sampling import load_for_sampling, resolve_size, save_png, set_scheduler

    note = on_progress or (lambda message: None)
    if not prompts:
        raise DeltaConvError("no prompts given")
    settings.check()
    check_seeds(range(settings.seed, settings.seed + len(prompts)))
    sampling = settings.sampling()
    sampling.check_model(model)
    recommended = sampling.for_model(model)
    settings = replace(settings, guidance=recommended.guidance, guidance_start=recommended.guidance_start)
    fid_plan = plan_fid(str(model), reference, settings.feature, len(prompts), include_original)
    out = Path(out)
    check_output_folder(out)
    loaded = load_for_sampling(model, None, device, dtype)
    if loaded.adapter is not None:  # the converted folder's own blocks stand for their mixer
        if loaded.adapter.config.mixer == "linfusion":
            linfusion_adapter = linfusion_adapter or loaded.adapter_path
        else:
            adapter = adapter or loaded.adapter_path
        loaded.adapter.unmount()
    students = {
        name: str(path) for name, path in (("deltaconv", adapter), ("linfusion", linfusion_adapter)) if path
    }
    systems = (["original"] if include_original else []) + list(students)
    if not systems:
        raise DeltaConvError(
            "nothing to evaluate: give --adapter and/or --linfusion-adapter, or keep the original"
        )
    pipe, dev = loaded.pipe, denoiser_of(loaded.pipe).device
    # Every student's blocks are read before any image is generated: a bad adapter costs no work.
    student_blocks = {name: adapter_for(path, pipe) for name, path in students.items()}
    for name, blocks in student_blocks.items():
        if blocks.config.mixer != name:
            raise DeltaConvError(f"{students[name]} holds {blocks.config.mixer} blocks, not {name}")
        blocks.check_matches(denoiser_of(pipe))
    size = resolve_size(loaded, settings.height, settings.width)
    tiled = use_tiled_vae(pipe, size)
    scheduler = set_scheduler(pipe, settings.scheduler)
    sample_settings = replace(settings.sampling(), height=size[0], width=size[1])
    seeds = [settings.seed + i for i in range(len(prompts))]
    generation = {
        "model": str(model),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "seed": settings.seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "guidance_rescale": settings.guidance_rescale,
        "guidance_start": settings.guidance_start,
        "size": list(size),
        "scheduler": scheduler,
        "device": str(dev),
        "dtype": str(denoiser_of(pipe).dtype),
    }
    report = EvalReport(str(model), str(out), len(prompts), fid_plan.reference, fid_plan.feature, *size,
                        str(dev), generation["dtype"], {**asdict(settings), "scheduler": scheduler},
                        skipped=dict(fid_plan.skipped), warnings=list(fid_plan.warnings),
                        vae_tiling=tiled)  # fmt: skip
    if not settings.clip_model:
        report.skipped["clip_score"] = "no --clip folder given (a local CLIP model)"
    if not include_original:
        report.skipped["psnr_ssim"] = "the original is not among the systems"
    images: dict[str, list[np.ndarray]] = {}
    adapters: dict[str, DeltaConvAdapter | None] = {}
    for name in systems:
        path = students.get(name)
        blocks = adapters[name] = student_blocks[name].mount(pipe) if path else None
        folder = out / "images" / name
        fingerprint = _fingerprint(generation, path)
        reused = _cached(folder, fingerprint, len(prompts))
        if reused:
            note(f"reusing {len(prompts)} images of {name} (same settings)")
            images[name] = _load_images(folder, len(prompts))
        else:
            shutil.rmtree(folder, ignore_errors=True)
            total = denoising_steps(len(prompts), sample_settings, settings.batch_size)
            counter = _step_counter(note, f"generating {len(prompts)} images with {name}", total)
            images[name] = generate(
                pipe, prompts, seeds, size, sample_settings, settings.batch_size, on_step=counter
            )
            for i, image in enumerate(images[name]):
                save_png(
                    image,
                    folder / f"{i:05d}.png",
                    {**generation, "system": name, "prompt": prompts[i], "seed": seeds[i]},
                )
            (folder / "settings.json").write_text(json.dumps(fingerprint, indent=1))
        result = SystemResult(name, path, len(prompts), reused)
        if blocks is not None and settings.trajectory_prompts > 0:
            subset = prompts[: settings.trajectory_prompts]
            total = denoising_steps(len(subset), sample_settings, settings.batch_size)
            counter = _step_counter(note, f"comparing {name} with the original along the trajectory", total)
            comparison = TrajectoryComparison(blocks)
            handle = denoiser_of(pipe).register_forward_hook(comparison, with_kwargs=True)
            try:
                with blocks.bypassed():
                    generate(pipe, subset, seeds[: len(subset)], size, sample_settings, settings.batch_size,
                             on_step=counter)  # fmt: skip
            finally:
                handle.remove()
            result.denoiser_relative_error = float(np.mean(comparison.errors))
        if blocks is not None:
            blocks.unmount()
        report.systems.append(result)

    if settings.timing_rounds == 0:
        report.skipped["timing"] = "timing rounds set to 0"
    else:
        report.timing = (f"one image per system, systems in turns: a warm-up round, then the median of "
                         f"{settings.timing_rounds} rounds")  # fmt: skip
        note(f"timing {', '.join(systems)} in turns ({settings.timing_rounds} rounds, medians)")
        timer = Timer(dev, torch.float32, settings.timing_rounds, budget_s=float("inf"))
        run = partial(pipeline_images, pipe, [prompts[0]], [settings.seed], size, sample_settings)
        timed = time_systems(run, pipe, adapters, timer)
        for result in report.systems:
            result.seconds_per_image, result.peak_memory_bytes = timed[result.name]
    _compare(report, images, prompts, out, fid_plan, dev, settings, note)
    return report


def _reference_folder(reference: str, out: Path, count: int) -> Path:
    """The folder of reference images: the original's images, the demo's real renders of the held-out
    scenes (written now), or the user's folder."""
    from .demo import DEMO
    from .demo.quality import HELD_OUT_SEED, real_images

    if reference == "original":
        return out / "images" / "original"
    if reference != DEMO:
        return Path(reference)
    folder = out / "images" / "real"  # real renders of the very scenes the held-out captions describe
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(real_images(HELD_OUT_SEED, count)):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def _step_counter(note: Callable[[str], None], what: str, total: int) -> Callable[[], None]:
    """A per-denoising-step callback that reports ``what: step i/total``."""
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        note(f"{what}: step {done}/{total}")

    note(f"{what}: step 0/{total}")
    return step


def _compare(report: EvalReport, images: dict[str, list[np.ndarray]], prompts: list[str], out: Path,
             fid_plan: FidPlan, device: torch.device, settings: EvalSettings,
             note: Callable[[str], None]) -> None:  # fmt: skip
    """Fill in FID, CLIP score, agreement with the original and demo adherence; write the grid."""
    reference_folder = _reference_folder(fid_plan.reference, out, len(prompts)) if fid_plan.computed else None
    feature = fid_plan.feature
    if reference_folder is not None:
        note(f"computing {feature} features")
        reference_features = folder_features(reference_folder, feature, device)
        for result in report.systems:
            result.fid = fid(
                folder_features(out / "images" / result.name, feature, device), reference_features
            )
    if settings.clip_model:
        note("computing CLIP scores")
        from torchmetrics.multimodal.clip_score import CLIPScore

        try:
            metric = CLIPScore(model_name_or_path=settings.clip_model)
        except Exception as err:  # transformers raises several types for a bad folder
            raise DeltaConvError(f"cannot load the CLIP model at {settings.clip_model}: {err}") from None
        for result in report.systems:
            batch = torch.from_numpy(np.stack(images[result.name])).permute(0, 3, 1, 2)
            result.clip_score = float(metric(batch, prompts))
            metric.reset()
    for result in report.systems:
        if result.name != "original" and "original" in images:
            result.psnr_db = psnr(images["original"], images[result.name])
            result.ssim = ssim(images["original"], images[result.name])
        adherence = domain_adherence(prompts, images[result.name])
        result.adherence = adherence[0] if adherence else None
    rows = [[images[r.name][i] for r in report.systems] for i in range(min(8, len(prompts)))]
    report.grid = str(out / "grid.png")
    scale = max(1, 128 // report.height)
    save_grid(rows, Path(report.grid), [r.name for r in report.systems], prompts[:8], scale=scale)
    (out / "eval.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
