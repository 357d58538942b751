"""``deltaconv convert``: a diffusers folder plus a ΔConv adapter, freshly initialised or imported.

OUT is a copy of the model folder (a normal diffusers folder: plain diffusers still loads the original
model from it) with the adapter alone in ``OUT/deltaconv``. With ``weights`` the adapter is read from
released weights (the ΔConv authors' or LinFusion's, see :mod:`deltaconv_cli.interop`); denoiser tensors
a ConvFusion file also carries replace those of the copy. The copy is written next to OUT and renamed
into place at the end, so OUT is never left half-written.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from .architectures import denoiser_of, native_latent_side
from .data import open_data
from .demo import DEMO
from .errors import DeltaConvError
from .files import atomic_path
from .loading import (
    ADAPTER_DIR,
    PICKLE_SUFFIXES,
    load_attention_weights,
    load_model,
    locate_model,
    model_name_or_path,
)
from .mixers import check_init
from .runtime import check_output_folder, check_seeds, numel
from .surgery import DeltaConvAdapter, find_self_attention_sites, trace_token_grids


@dataclass
class ReplacedLayer:
    name: str
    stage: str
    grid_stride: int  # latent pixels per token along each axis at this layer
    channels: int
    kernel_size: int | None  # None for mixers without kernels (LinFusion)
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
    init: str = "teacher"  # or "imported"
    calibration: dict[str, Any] | None = None  # what the start was fitted on, and its cost
    mixer: str = "deltaconv"
    imported: dict[str, Any] | None = None  # with weights: their source, format and what they replaced
    base_model: str | None = None  # the model the blocks were made for (adapter config), where known
    warnings: list[str] = field(default_factory=list)

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
        resolution = native_latent_side(denoiser_of(pipe)) * folder.vae_factor
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
    weights: str | Path | None = None,
    ema: bool = False,
    scales: tuple[float, ...] | None = None,
) -> ConversionReport:
    """Write ``out``: the model of ``source`` plus a new ΔConv adapter for all its self-attention,
    started from each attention's weights (``init="teacher"``, reading only those) or randomly; or,
    with ``weights``, the blocks (and other denoiser tensors) of released weights, in whatever layout
    (:data:`deltaconv_cli.interop.FORMATS`; ``ema`` and ``scales`` as
    :func:`~deltaconv_cli.interop.read_weights` takes them). The adapter records the model it was made
    for (``base_model_name_or_path``)."""
    check_init(init)
    check_seeds([seed])
    if weights is None and (ema or scales is not None):
        raise DeltaConvError(f"{'--ema' if ema else '--scales'} reads released weights: give --weights too")
    if weights is not None:
        given = {"kernel sizes": kernel_sizes is not None, "a gate": gate != "scaled",
                 "an init": init != "teacher", "calibration data": calibration_data is not None}  # fmt: skip
        clash = next((name for name, set_ in given.items() if set_), None)
        if clash:
            raise DeltaConvError(
                f"imported weights bring their own blocks: {clash} cannot be given with them"
            )
    out = Path(out).expanduser()
    check_output_folder(out)
    if out.exists() and not _is_empty_dir(out) and not overwrite:
        raise DeltaConvError(f"{out} is not empty; pass --overwrite to replace it")
    folder = locate_model(source)
    if out.resolve() == folder.path.resolve() or folder.path.resolve() in out.resolve().parents:
        raise DeltaConvError(f"the output folder {out} must not be the model folder or lie inside it")

    denoiser = folder.meta_denoiser()
    if weights is not None:
        return _import(folder, source, denoiser, weights, out, show_progress, ema=ema, scales=scales)
    calibration_data = calibration_data or (DEMO if str(source) == DEMO and init == "teacher" else None)
    if calibration_data is not None and (init != "teacher" or not folder.is_pipeline):
        raise DeltaConvError("calibration data fits a teacher-initialised start and needs a whole pipeline")
    if calibration_data is not None:
        open_data(calibration_data)  # a clear error for a bad data folder before any weight is read
    try:
        base = model_name_or_path(source, folder)
        adapter = DeltaConvAdapter.construct_for(
            denoiser, kernel_sizes, gate=gate, seed=seed, init=init, base_model_name_or_path=base
        )
    except ValueError as err:
        raise DeltaConvError(str(err)) from None
    report = _report(source, out, folder, denoiser, adapter)  # traces grids: all weights still on meta
    report.init = init
    if init == "teacher":  # reads only the attention weights, not the whole model
        load_attention_weights(folder, denoiser, find_self_attention_sites(denoiser))
        adapter.initialise_from(denoiser, init)
    if calibration_data is not None:
        report.calibration = _calibrate(folder, adapter, calibration_data, seed)
    _write(folder, out, adapter, {}, show_progress)
    return report


def _report(
    source: str | Path, out: Path, folder: Any, denoiser: Any, adapter: DeltaConvAdapter
) -> ConversionReport:
    """The replaced layers of ``denoiser`` (on the meta device) and their parameter counts."""
    report = ConversionReport(str(source), str(out), folder.denoiser_class, adapter.config.family)
    report.mixer = adapter.config.mixer
    report.base_model = adapter.config.base_model_name_or_path
    report.params_before = numel(denoiser)
    latent = native_latent_side(denoiser)
    grids = trace_token_grids(denoiser, latent, latent)
    sites = {s.name: s for s in find_self_attention_sites(denoiser)}
    for target, block in zip(adapter.config.targets, adapter.blocks, strict=True):
        site = sites[target]
        report.layers.append(
            ReplacedLayer(
                name=site.name,
                stage=site.stage,
                grid_stride=latent // grids[site.name][0],
                channels=site.channels,
                kernel_size=getattr(block, "kernel_size", None),
                attention_params=numel(denoiser.get_submodule(site.name)),
                block_params=numel(block),
            )
        )
    return report


def _import(folder: Any, source: str | Path, denoiser: Any, weights: str | Path, out: Path,
            show_progress: bool, **options: Any) -> ConversionReport:  # fmt: skip
    """``convert`` with released weights: check them against the model, then write the folder."""
    from .interop import read_weights

    imported = read_weights(weights, denoiser, **options)
    report = _report(source, out, folder, denoiser, imported.adapter)
    report.init = "imported"
    report.imported = {
        "source": imported.source,
        "format": imported.format,
        "replaced_tensors": sorted(imported.replaced),
        "kept_attention": imported.kept_attention,
        "key_nesting": imported.key_nesting,
        "scales": list(imported.adapter.config.scales) if imported.format == "convfusion" else None,
        "scales_from": imported.scales_from,
        "base_model_note": imported.base_model_note,
    }
    model = model_name_or_path(source, folder)
    report.base_model = imported.base_model
    if imported.base_model is None:
        imported.adapter.register_to_config(base_model_name_or_path=model)
        report.base_model = model
        note = imported.base_model_note
        report.imported["base_model_note"] = f"{note}; recorded as MODEL, {model}" if note else \
            f"the weights do not say; recorded as MODEL, {model}"  # fmt: skip
    elif imported.base_model.lower() != model.lower() and not Path(model).is_absolute():
        # A local folder's model is unknown: the report names the right one instead of warning.
        report.warnings.append(
            f"these blocks were made for {imported.base_model}, and MODEL is {model}: on another model "
            "they do not compute what their authors measured"
        )
    _write(folder, out, imported.adapter, imported.replaced, show_progress)
    return report


def _replace_tensors(component: Path, replaced: dict[str, torch.Tensor]) -> None:
    """Put ``replaced`` into the safetensors weight files of the denoiser folder ``component`` (each
    tensor in every file that holds its key, in that file's dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    found = set()
    for path in sorted(component.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            keys, metadata = list(file.keys()), file.metadata()
            if not replaced.keys() & set(keys):
                continue
            tensors = {key: file.get_tensor(key) for key in keys}
        for key in replaced.keys() & set(keys):
            tensors[key] = replaced[key].to(tensors[key].dtype)
            found.add(key)
        save_file(tensors, str(path), metadata=metadata)
    missing = sorted(replaced.keys() - found)
    if missing:
        raise DeltaConvError(f"the denoiser's weight files hold no tensor {missing[0]} to replace")


def _write(folder: Any, out: Path, adapter: DeltaConvAdapter, replaced: dict[str, torch.Tensor],
           show_progress: bool) -> None:  # fmt: skip
    """Copy the model into a staging folder next to ``out``, add the adapter (and replaced denoiser
    tensors), then rename it into place."""
    with atomic_path(out) as staging:
        _copy_model_files(folder.path, staging, show_progress)
        if replaced:
            _replace_tensors(staging / (folder.denoiser_subfolder or ""), replaced)
        adapter.save_pretrained(staging / ADAPTER_DIR)
