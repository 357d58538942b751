"""``deltaconv convert``: a diffusers folder plus a freshly initialised ΔConv adapter.

OUT is a copy of the model folder (a normal diffusers folder: plain diffusers still loads the original
model from it) with the adapter alone in ``OUT/deltaconv``. The copy is written next to OUT and renamed
into place at the end, so OUT is never left half-written.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from .architectures import denoiser_of
from .data import open_data
from .demo import DEMO
from .errors import DeltaConvError
from .loading import ADAPTER_DIR, PICKLE_SUFFIXES, load_attention_weights, load_model, locate_model
from .mixers import check_init
from .runtime import numel
from .surgery import DeltaConvAdapter, find_self_attention_sites, trace_token_grids


@dataclass
class ReplacedLayer:
    name: str
    stage: str
    grid_stride: int  # latent pixels per token along each axis at this layer
    channels: int
    kernel_size: int
    attention_params: int
    block_params: int


@dataclass
class ConversionReport:
    source: str
    out: str
    denoiser_class: str
    family: str
    layers: list[ReplacedLayer] = field(default_factory=list)
    params_before: int = 0
    init: str = "teacher"
    calibration: dict[str, Any] | None = None  # what the start was fitted on, and its cost

    @property
    def params_removed(self) -> int:
        return sum(layer.attention_params for layer in self.layers)

    @property
    def params_added(self) -> int:
        return sum(layer.block_params for layer in self.layers)

    @property
    def params_after(self) -> int:
        return self.params_before - self.params_removed + self.params_added

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            params_removed=self.params_removed, params_added=self.params_added, params_after=self.params_after
        )
        return data


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _copy_model_files(src: Path, dst: Path, show_progress: bool) -> None:
    """Copy src to dst without pickle weights (safetensors twins are present) or an old adapter."""
    files = [
        f
        for f in sorted(src.rglob("*"))
        if f.is_file()
        and f.suffix not in PICKLE_SUFFIXES
        and f.relative_to(src).parts[0] != ADAPTER_DIR
        and ".cache" not in f.relative_to(src).parts
    ]
    total = sum(f.stat().st_size for f in files)
    columns = (TextColumn("copying model"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not show_progress) as progress:
        task = progress.add_task("copy", total=total)
        for f in files:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)  # follows hub-cache symlinks to the real files
            progress.advance(task, f.stat().st_size)


def _calibrate(folder: Any, adapter: DeltaConvAdapter, data: str, seed: int) -> dict[str, Any]:
    """Fit the new blocks to the teacher on ``data`` at the model's native size (loads the pipeline)."""
    from .calibration import calibrate

    pipe = load_model(folder)
    adapter.mount(pipe, dtype=torch.float32)
    try:
        native = denoiser_of(pipe).config.sample_size
        resolution = (native if isinstance(native, int) else native[0]) * folder.vae_factor
        fit = calibrate(pipe, adapter, data, resolution, seed=seed)
    finally:
        adapter.unmount()
    return {"data": data, "samples": fit.samples, "timesteps": fit.timesteps, "seconds": fit.seconds,
            "error_before": fit.error_before, "error_after": fit.error_after,
            "summary": fit.summary()}  # fmt: skip


def convert(
    source: str | Path,
    out: str | Path,
    *,
    kernel_sizes: int | Mapping[str, int] | None = None,
    gate: str = "scaled",
    seed: int = 0,
    init: str = "teacher",
    calibration_data: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ConversionReport:
    """Write ``out``: the model of ``source`` plus a new ΔConv adapter for all its self-attention,
    started from each attention's weights (``init="teacher"``, reading only those) or randomly."""
    check_init(init)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DeltaConvError(f"{out} exists and is not a folder")
    if out.exists() and not _is_empty_dir(out) and not overwrite:
        raise DeltaConvError(f"{out} is not empty; pass --overwrite to replace it")
    folder = locate_model(source)
    if out.resolve() == folder.path.resolve() or folder.path.resolve() in out.resolve().parents:
        raise DeltaConvError(f"the output folder {out} must not be the model folder or lie inside it")

    denoiser = folder.meta_denoiser()
    calibration_data = calibration_data or (DEMO if str(source) == DEMO and init == "teacher" else None)
    if calibration_data is not None and (init != "teacher" or not folder.is_pipeline):
        raise DeltaConvError("calibration data fits a teacher-initialised start and needs a whole pipeline")
    if calibration_data is not None:
        open_data(calibration_data)  # a clear error for a bad data folder before any weight is read
    try:
        adapter = DeltaConvAdapter.construct_for(denoiser, kernel_sizes, gate=gate, seed=seed, init=init)
    except ValueError as err:
        raise DeltaConvError(str(err)) from None
    sites = find_self_attention_sites(denoiser)
    latent = denoiser.config.sample_size
    latent = latent if isinstance(latent, int) else latent[0]
    grids = trace_token_grids(denoiser, latent, latent)
    report_calibration = None
    if init == "teacher":  # reads only the attention weights, not the whole model
        load_attention_weights(folder, denoiser, sites)
        adapter.initialise_from(denoiser, init)
    if calibration_data is not None:
        report_calibration = _calibrate(folder, adapter, calibration_data, seed)
    report = ConversionReport(str(source), str(out), folder.denoiser_class, adapter.config.family)
    report.init, report.calibration = init, report_calibration
    report.params_before = numel(denoiser)
    for site, block in zip(sites, adapter.blocks, strict=True):
        report.layers.append(
            ReplacedLayer(
                name=site.name,
                stage=site.stage,
                grid_stride=latent // grids[site.name][0],
                channels=site.channels,
                kernel_size=block.kernel_size,
                attention_params=numel(denoiser.get_submodule(site.name)),
                block_params=numel(block),
            )
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    retired = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        _copy_model_files(folder.path, staging, show_progress)
        adapter.save_pretrained(staging / ADAPTER_DIR)
        if out.exists():
            out.rename(retired)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not out.exists():
            retired.rename(out)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return report
