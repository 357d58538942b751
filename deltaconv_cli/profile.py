"""``deltaconv profile``: cost of self-attention vs ΔConvBlock vs LinFusion, per layer and per model.

Counting needs no weights: every module is built on the meta device and run under PyTorch's
``FlopCounterMode`` (multiply-adds = its FLOPs / 2), with a handle for ``scaled_dot_product_attention``
(PyTorch's counter decomposes it into an N x N matmul on the meta device and counts the CPU kernel as
zero) and a tracker of the bytes of live intermediate tensors (activation memory, inference, batch 1).
``measure=True`` also times each mixer at each layer shape on a device, and whole denoiser steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from .architectures import (
    BUILTIN_ARCHITECTURES,
    denoiser_inputs,
    family_of,
    latent_size,
    latent_stride,
    meta_denoiser,
    native_latent_side,
)
from .block import DeltaConvBlock
from .errors import DeltaConvError
from .loading import locate_model, locate_pipeline, read_json_object
from .mixers import MIXERS as MIXER_KINDS
from .runtime import LiveBytes, Timer, checked_device, free_bytes, numel, torch_dtype
from .surgery import DeltaConvAdapter, default_kernel_sizes, find_self_attention_sites, trace_token_grids

MIXERS = ("attention", *MIXER_KINDS)  # the original, then every replacement
PAPER_RATIO = 6929  # "6929x lower computational cost than self-attention in SD1.5" (paper, Figure 1)


# ----------------------------------------------------------------------------------------------- counting


class _SDPAHandle(TorchFunctionMode):
    """Counts ``scaled_dot_product_attention`` by its closed form, B h N M (d + d_v), and on the meta
    device returns an empty result instead of materialising the N x M scores (fused kernels do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            self.macs += q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            if q.device.type == "meta":
                return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **kwargs)


def count(run: Callable[[], Any]) -> tuple[int, int]:
    """Multiply-adds and peak activation bytes of ``run()`` (no gradients)."""
    sdpa, flops, memory = _SDPAHandle(), FlopCounterMode(display=False), LiveBytes()
    with torch.no_grad(), sdpa, flops, memory:
        result = run()
        del result
    return flops.get_total_flops() // 2 + sdpa.macs, memory.peak


# ----------------------------------------------------------------------------------------------- report


@dataclass
class Cost:
    macs: int
    params: int
    activation_bytes: int  # counted peak of intermediate tensors, batch 1
    latency_ms: float | None = None  # measured (median)
    peak_bytes: int | None = None  # measured
    skipped: str | None = None  # why it was not measured


@dataclass
class LayerProfile:
    name: str
    stage: str
    grid: tuple[int, int]
    channels: int
    heads: int
    kernel_size: int
    attention: Cost
    deltaconv: Cost
    linfusion: Cost


@dataclass
class ResolutionProfile:
    height: int  # pixels
    width: int
    latent: tuple[int, int]
    layers: list[LayerProfile]
    denoiser_macs: int
    denoiser_activation_bytes: int
    step_latency_ms: dict[str, float] = field(default_factory=dict)  # measured whole-denoiser steps
    step_skipped: dict[str, str] = field(default_factory=dict)

    def total(self, mixer: str, attr: str = "macs") -> float:
        return sum(getattr(getattr(layer, mixer), attr) or 0 for layer in self.layers)

    @property
    def attention_over_deltaconv(self) -> float:
        return self.total("attention") / self.total("deltaconv")

    @property
    def linfusion_over_deltaconv(self) -> float:
        return self.total("linfusion") / self.total("deltaconv")

    @property
    def attention_share(self) -> float:
        """Share of the whole denoiser's multiply-adds spent in self-attention."""
        return self.total("attention") / self.denoiser_macs


@dataclass
class ProfileReport:
    model: str
    denoiser_class: str
    family: str
    vae_factor: int
    device: str
    dtype: str
    resolutions: list[ResolutionProfile]
    paper_ratio: int = PAPER_RATIO
    paper_ratio_passed_at: int | None = None  # square side in pixels where attention/ΔConv passes it
    ratio_at_crossing: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for res, raw in zip(self.resolutions, data["resolutions"], strict=True):
            raw["totals_macs"] = {m: res.total(m) for m in MIXERS}
            raw["attention_over_deltaconv"] = res.attention_over_deltaconv
            raw["linfusion_over_deltaconv"] = res.linfusion_over_deltaconv
            raw["attention_share"] = res.attention_share
        return data


# ----------------------------------------------------------------------------------------------- models


@dataclass
class Architecture:
    label: str
    denoiser_class: str
    config: dict[str, Any]
    vae_factor: int
    kernel_sizes: dict[str, int] | None = None  # per site, from a converted model's adapter


def resolve_architecture(source: str) -> Architecture:
    """A built-in name (sd15, sd21, sdxl, pixart-sigma) or any diffusers folder / hub id (config only)."""
    if source in BUILTIN_ARCHITECTURES:
        class_name, config = BUILTIN_ARCHITECTURES[source]
        return Architecture(source, class_name, config, 8)
    folder = locate_model(source, config_only=True)
    sizes = None
    adapter_config = folder.adapter_path / "config.json"
    if adapter_config.is_file():
        config = read_json_object(adapter_config)
        if config.get("mixer", "deltaconv") == "deltaconv":
            targets, kernel_sizes = config.get("targets"), config.get("kernel_sizes")
            listed = isinstance(targets, list) and isinstance(kernel_sizes, list)
            if not listed or len(targets) != len(kernel_sizes):
                raise DeltaConvError(f"{adapter_config} does not list the adapter's targets and kernel_sizes")
            sizes = dict(zip(targets, kernel_sizes, strict=True))
    return Architecture(str(source), folder.denoiser_class, folder.denoiser_config, folder.vae_factor, sizes)


def parse_resolution(text: str) -> tuple[int, int]:
    """``"1024"`` (square) or ``"1024x768"`` (height x width), in pixels."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise DeltaConvError(f"resolution must be N or HxW in pixels, got {text!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise DeltaConvError(f"resolution must be N or HxW in pixels, got {text!r}")
    return (sizes[0], sizes[-1])


def _mixers(channels: int, heads: int, kernel_size: int, attention: nn.Module) -> dict[str, nn.Module]:
    """The original attention and every mixer of :data:`~deltaconv_cli.mixers.MIXERS` for one site."""
    bias = attention.to_q.bias is not None
    return {"attention": attention, **{name: kind.build(channels, heads, kernel_size, None, bias)
                                       for name, kind in MIXER_KINDS.items()}}  # fmt: skip


def _mixer_input(mixer: str, grid: tuple[int, int], channels: int, **kw: Any) -> torch.Tensor:
    shape = (1, grid[0] * grid[1], channels) if mixer == "attention" else (1, *grid, channels)
    return torch.randn(shape, **kw) if kw.get("device", "meta") != "meta" else torch.empty(shape, **kw)


# ----------------------------------------------------------------------------------------------- profile


def check_timing(repeats: int, time_budget_s: float) -> None:
    """A clear error for timing settings that cannot time anything."""
    if repeats < 1:
        raise DeltaConvError(f"repeats must be at least 1, got {repeats}")
    if not (math.isfinite(time_budget_s) and time_budget_s > 0):
        raise DeltaConvError(f"time budget must be a positive number of seconds, got {time_budget_s}")


def profile(
    source: str = "sd15",
    resolutions: Sequence[tuple[int, int]] = ((512, 512), (1024, 1024), (2048, 2048), (4096, 4096)),
    *,
    device: str = "cpu",
    dtype: str = "float32",
    measure: bool = False,
    repeats: int = 5,
    time_budget_s: float = 30.0,
    find_paper_ratio: bool = True,
    on_progress: Callable[[str], None] | None = None,
) -> ProfileReport:
    """Count (and with ``measure`` time) the three mixers at every self-attention site of ``source``."""
    check_timing(repeats, time_budget_s)
    weights_dtype = torch_dtype(dtype)
    dev = checked_device(device)
    arch = resolve_architecture(source)
    meta = meta_denoiser(arch.denoiser_class, arch.config, weights_dtype)
    sites = find_self_attention_sites(meta)
    by_stage = default_kernel_sizes(meta)
    kernels = {s.name: (arch.kernel_sizes or {}).get(s.name, by_stage[s.stage]) for s in sites}
    stride = latent_stride(meta)
    latents = [latent_size(h, w, arch.vae_factor, stride) for h, w in resolutions]
    timer = Timer(dev, weights_dtype, repeats, time_budget_s) if measure else None
    note = on_progress or (lambda message: None)

    cache: dict[tuple, dict[str, Cost]] = {}
    results = []
    for (height, width), latent in zip(resolutions, latents, strict=True):
        note(f"counting {height}x{width}")
        grids = trace_token_grids(meta, *latent)
        layers = []
        for site in sites:
            grid, k = grids[site.name], kernels[site.name]
            key = (grid, site.channels, site.heads, k)
            if key not in cache:
                cache[key] = _layer_costs(
                    meta.get_submodule(site.name), grid, site, k, weights_dtype, timer, note
                )
            costs = cache[key]
            layers.append(LayerProfile(site.name, site.stage, grid, site.channels, site.heads, k, **costs))
        macs, act = count(partial(meta, **denoiser_inputs(meta, 1, *latent)))
        results.append(ResolutionProfile(height, width, latent, layers, macs, act))

    if timer is not None:
        _measure_steps(arch, results, timer, kernels, note)
    report = ProfileReport(
        arch.label, arch.denoiser_class, family_of(meta), arch.vae_factor, str(dev), dtype, results
    )
    if find_paper_ratio:
        note("finding where attention/ΔConv passes the paper's ratio")
        report.paper_ratio_passed_at, report.ratio_at_crossing = paper_ratio_crossing(
            meta, kernels, arch.vae_factor * stride, arch.vae_factor
        )
    return report


def _layer_costs(
    attention: nn.Module,
    grid: tuple[int, int],
    site: Any,
    kernel_size: int,
    dtype: torch.dtype,
    timer: Timer | None,
    note: Callable[[str], None],
) -> dict[str, Cost]:
    with torch.device("meta"):
        modules = _mixers(site.channels, site.heads, kernel_size, attention)
    costs = {}
    for name, module in modules.items():
        module = module.to(dtype)
        x = _mixer_input(name, grid, site.channels, device="meta", dtype=dtype)
        macs, act = count(partial(module, x))
        costs[name] = Cost(macs, numel(module), act)
    if timer is not None:
        for name, cost in costs.items():
            note(f"timing {name} at {grid[0]}x{grid[1]}x{site.channels}")
            input_bytes = grid[0] * grid[1] * site.channels * dtype.itemsize
            cost.skipped = timer.skip_reason(cost.macs, cost.activation_bytes + input_bytes + cost.params * 4)
            if cost.skipped:
                continue
            module = _real_mixer(name, site, kernel_size, timer)
            x = _mixer_input(name, grid, site.channels, device=timer.device, dtype=timer.dtype)
            cost.latency_ms = timer.latency_ms(partial(module, x))
            cost.peak_bytes = timer.peak_bytes(partial(module, x))
            del module, x
    return costs


def _real_mixer(name: str, site: Any, kernel_size: int, timer: Timer) -> nn.Module:
    from diffusers.models.attention_processor import Attention

    with torch.device(timer.device):
        attention = Attention(site.channels, heads=site.heads, dim_head=site.channels // site.heads)
        module = _mixers(site.channels, site.heads, kernel_size, attention)[name]
    return module.to(timer.dtype).eval()


@contextlib.contextmanager
def mounted(adapter: DeltaConvAdapter | None, model: Any) -> Iterator[None]:
    """While inside, ``model`` (pipeline or denoiser) computes with ``adapter``'s blocks; with None, as
    itself."""
    if adapter is not None:
        adapter.mount(model)
    try:
        yield
    finally:
        if adapter is not None:
            adapter.unmount()


def time_systems(
    run: Callable[[], Any], model: Any, systems: dict[str, DeltaConvAdapter | None], timer: Timer
) -> dict[str, tuple[float, int]]:
    """Median seconds of ``run()`` and its peak memory (bytes) with each system's adapter mounted on
    ``model`` (None: the original), timed in turns (:meth:`Timer.interleaved_latency_ms`): ``eval`` and
    the end-to-end sweep time systems with this one function."""
    setups = {name: partial(mounted, adapter, model) for name, adapter in systems.items()}
    latency_ms = timer.interleaved_latency_ms(run, setups)
    peaks = {}
    for name, setup in setups.items():
        with setup():
            peaks[name] = timer.peak_bytes(run)
    return {name: (latency_ms[name] / 1e3, peaks[name]) for name in setups}


def _measure_steps(
    arch: Architecture,
    results: list[ResolutionProfile],
    timer: Timer,
    kernels: dict[str, int],
    note: Callable[[str], None],
) -> None:
    """Whole-denoiser step latency (batch 1): original, with ΔConv blocks, with LinFusion."""
    from .architectures import denoiser_class

    weights = numel(meta_denoiser(arch.denoiser_class, arch.config))
    needed = weights * timer.dtype.itemsize
    if needed > 0.6 * free_bytes(timer.device):
        for res in results:
            res.step_skipped = dict.fromkeys(MIXERS, f"weights need {needed / 2**30:.1f} GiB")
        return
    note("building the denoiser with random weights for step timing")
    with torch.device(timer.device):
        denoiser = denoiser_class(arch.denoiser_class).from_config(arch.config)
    denoiser = nn.Module.to(denoiser, timer.dtype).eval()  # nn.Module.to: no diffusers dtype warning
    adapters = {"attention": None}
    adapters.update(
        {name: DeltaConvAdapter.construct_for(denoiser, kernels, mixer=name) for name in MIXER_KINDS}
    )

    for res in results:
        setups = {}
        for mixer, adapter in adapters.items():
            macs = res.denoiser_macs - res.total("attention") + res.total(mixer)
            reason = timer.skip_reason(macs, res.denoiser_activation_bytes)
            if reason:
                res.step_skipped[mixer] = reason
            else:
                setups[mixer] = partial(mounted, adapter, denoiser)
        if setups:
            note(f"timing {', '.join(setups)} denoiser steps in turns at {res.height}x{res.width}")
            inputs = denoiser_inputs(denoiser, 1, *res.latent, generator=torch.Generator().manual_seed(0))
            res.step_latency_ms.update(timer.interleaved_latency_ms(partial(denoiser, **inputs), setups))


def paper_ratio_crossing(
    meta: nn.Module, kernels: dict[str, int], step: int, vae_factor: int, limit: int = 65536
) -> tuple[int | None, float | None]:
    """Smallest square side (pixels, a multiple of ``step``) where attention/ΔConv multiply-adds, summed
    over all self-attention sites, pass PAPER_RATIO; None when not reached below ``limit`` pixels."""
    sites = find_self_attention_sites(meta)

    def ratio(side: int) -> float:
        grids = trace_token_grids(meta, side // vae_factor, side // vae_factor)
        totals = dict.fromkeys(("attention", "deltaconv"), 0)
        for site in sites:
            h, w = grids[site.name]
            attention = meta.get_submodule(site.name)
            with torch.device("meta"):
                block = DeltaConvBlock(site.channels, kernels[site.name]).to(attention.to_q.weight.dtype)
            dtype = attention.to_q.weight.dtype
            x = torch.empty(1, h * w, site.channels, device="meta", dtype=dtype)
            totals["attention"] += count(partial(attention, x))[0]
            totals["deltaconv"] += count(partial(block, x.view(1, h, w, site.channels)))[0]
        return totals["attention"] / totals["deltaconv"]

    low, high = 1, limit // step
    if ratio(high * step) < PAPER_RATIO:
        return None, None
    while low < high:  # the ratio grows with the number of tokens
        mid = (low + high) // 2
        if ratio(mid * step) >= PAPER_RATIO:
            high = mid
        else:
            low = mid + 1
    return high * step, ratio(high * step)


def plot(report: ProfileReport, path: Path) -> None:
    """Log-log PNG of multiply-adds (and measured latency) vs resolution for the three mixers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [math.sqrt(r.height * r.width) for r in report.resolutions]
    measured = any(layer.attention.latency_ms is not None for r in report.resolutions for layer in r.layers)
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(12 if measured else 6.5, 4.5), squeeze=False)
    labels = {"attention": "self-attention", **{name: kind.label for name, kind in MIXER_KINDS.items()}}
    ax = axes[0][0]
    for mixer in MIXERS:
        ax.plot(sides, [r.total(mixer) for r in report.resolutions], "o-", label=labels[mixer])
    ax.plot(sides, [r.denoiser_macs for r in report.resolutions], "k--", label="whole denoiser (original)")
    ax.set(xscale="log", yscale="log", xlabel="image side (pixels)", ylabel="multiply-adds per image")
    ax.set_title(f"{report.model}: all {len(report.resolutions[0].layers)} self-attention sites")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if measured:
        ax = axes[0][1]
        for mixer in MIXERS:
            points = [
                (side, r.total(mixer, "latency_ms"))
                for side, r in zip(sides, report.resolutions, strict=True)
                if all(getattr(layer, mixer).latency_ms is not None for layer in r.layers)
            ]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=labels[mixer])
        ax.set(xscale="log", yscale="log", xlabel="image side (pixels)", ylabel="ms per image, all layers")
        ax.set_title(f"measured on {report.device} ({report.dtype})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- end to end


SYSTEMS = ("original", *MIXER_KINDS)  # the systems an end-to-end sweep times


@dataclass
class SystemTiming:
    macs_per_image: int  # counted: denoiser multiply-adds per step x steps x guidance batch
    seconds_per_image: float | None = None  # measured median, VAE decoding included
    peak_bytes: int | None = None  # measured peak of one image above the loaded model
    skipped: str | None = None  # why it was not measured (with the estimate)


@dataclass
class SizeTiming:
    height: int
    width: int
    vae_tiling: bool
    systems: dict[str, SystemTiming]

    def speedup(self, system: str) -> float | None:
        """Original's seconds per image over ``system``'s, where both were measured."""
        original, other = self.systems["original"].seconds_per_image, self.systems[system].seconds_per_image
        return None if original is None or other is None else original / other


@dataclass
class EndToEndReport:
    model: str
    prompt: str
    device: str
    dtype: str
    steps: int
    guidance: float
    repeats: int
    time_budget_s: float
    adapters: dict[str, str]  # system -> adapter folder, or how its blocks were made
    sizes: list[SizeTiming]
    crossover: dict[str, int | None] = field(default_factory=dict)  # system -> side in pixels
    memory: str = ""  # what peak_bytes counts

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for size, raw in zip(self.sizes, data["sizes"], strict=True):
            raw["speedup_over_original"] = {name: size.speedup(name) for name in MIXER_KINDS}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndToEndReport:
        """The report :meth:`to_dict` wrote (to re-plot or re-tabulate a saved sweep)."""
        sizes = [
            SizeTiming(raw["height"], raw["width"], raw["vae_tiling"],
                       {name: SystemTiming(**timing) for name, timing in raw["systems"].items()})
            for raw in data["sizes"]
        ]  # fmt: skip
        return cls(**{**data, "sizes": sizes})


def crossover_side(sizes: Sequence[SizeTiming], system: str) -> int | None:
    """Smallest image side from which ``system`` is faster than the original at every larger size where
    both were measured; None if it is not faster at the largest such size."""
    both = [s for s in sizes if s.speedup(system) is not None]
    side = None
    for size in reversed(both):
        if size.speedup(system) <= 1.0:
            break
        side = int(math.sqrt(size.height * size.width))
    return side


def end_to_end(
    model: str = "demo",
    resolutions: Sequence[tuple[int, int]] = (),
    *,
    adapter: str | Path | None = None,
    linfusion_adapter: str | Path | None = None,
    prompt: str | None = None,
    steps: int = 4,
    guidance: float | None = None,
    repeats: int = 3,
    time_budget_s: float = 300.0,
    device: str | None = None,
    dtype: str | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> EndToEndReport:
    """Seconds per image and peak memory of whole pipeline calls (prompt to decoded image) for the
    original, ΔConv and LinFusion at each resolution, the systems timed in turns.

    Without ``adapter`` / ``linfusion_adapter`` (and a converted folder's own adapter) blocks with
    random weights are timed: the time of a block does not depend on its weights' values. A system whose
    estimated time (its last measured size scaled by counted multiply-adds, or the multiply-adds at the
    device's matmul rate) exceeds ``time_budget_s`` is skipped with the estimate, as ``profile`` does.
    Images larger than the VAE's native size are decoded tiled (:func:`use_tiled_vae`)."""
    from .conditioning import use_tiled_vae
    from .interop import adapter_for
    from .runtime import default_device
    from .sampling import SampleSettings, load_for_sampling, pipeline_images

    note = on_progress or (lambda message: None)
    settings = SampleSettings(steps, guidance).for_model(model)
    settings.check()
    check_timing(repeats, time_budget_s)
    if model in BUILTIN_ARCHITECTURES:
        raise DeltaConvError(
            f"{model} is a built-in configuration without weights; end-to-end timing needs a pipeline "
            "(demo, a model folder or a hub id). Whole denoiser steps of it: profile --measure"
        )
    dev = checked_device(device or default_device())
    weights_dtype = dtype or ("float16" if dev.type == "cuda" else "float32")
    timer_dtype = torch_dtype(weights_dtype)
    locate_pipeline(model, "end-to-end timing", config_only=True)
    arch = resolve_architecture(model)
    meta = meta_denoiser(arch.denoiser_class, arch.config)
    if not resolutions:
        side = native_latent_side(meta) * arch.vae_factor
        resolutions = [(side * f, side * f) for f in (1, 2, 4)]
    for height, width in resolutions:
        latent_size(height, width, arch.vae_factor, latent_stride(meta))
    counted = profile(model, resolutions, dtype=weights_dtype, find_paper_ratio=False, on_progress=note)

    note("loading the pipeline")
    loaded = load_for_sampling(model, None, str(dev), weights_dtype)
    pipe = loaded.pipe
    given = {"deltaconv": adapter, "linfusion": linfusion_adapter}
    if loaded.adapter is not None:
        loaded.adapter.unmount()
        given[loaded.adapter.config.mixer] = given[loaded.adapter.config.mixer] or loaded.adapter_path
    systems: dict[str, DeltaConvAdapter | None] = {"original": None}
    sources = {"original": str(model)}
    for name in MIXER_KINDS:
        if given.get(name) is not None:
            systems[name] = adapter_for(given[name], pipe)
            if systems[name].config.mixer != name:
                raise DeltaConvError(f"{given[name]} holds {systems[name].config.mixer} blocks, not {name}")
            sources[name] = str(given[name])
        else:
            systems[name] = DeltaConvAdapter.construct_for(pipe, arch.kernel_sizes, mixer=name, seed=0,
                                                           init="random")  # fmt: skip
            sources[name] = "blocks with random weights (timing does not depend on their values)"
    prompt = prompt or _default_prompt(model)
    timer = Timer(dev, timer_dtype, repeats, time_budget_s)
    guidance_batch = 2 if settings.guidance > 1 else 1  # classifier-free guidance doubles the batch
    report = EndToEndReport(str(model), prompt, str(dev), weights_dtype, steps, settings.guidance, repeats,
                            time_budget_s, sources, [], memory=timer.peak_kind)  # fmt: skip
    last: dict[str, tuple[int, float]] = {}  # system -> (macs, seconds) at its last measured size
    for res in counted.resolutions:
        size = (res.height, res.width)
        timings = {}
        for name in systems:
            mixer = "attention" if name == "original" else name
            macs = (res.denoiser_macs - res.total("attention") + res.total(mixer)) * steps * guidance_batch
            timings[name] = SystemTiming(macs)
            if name in last:
                estimate = last[name][1] * macs / last[name][0]
            else:
                estimate = macs / timer.macs_per_s
            total = estimate * (repeats + 2)  # warm-up, repeats, the memory run
            if total > time_budget_s:
                timings[name].skipped = f"estimated {estimate:.0f} s per image, x{repeats + 2} runs > budget"
            elif res.denoiser_activation_bytes * guidance_batch > 0.8 * free_bytes(dev):
                needed = res.denoiser_activation_bytes * guidance_batch
                timings[name].skipped = f"needs about {needed / 2**30:.1f} GiB of activations"
        tiled = use_tiled_vae(pipe, size)
        measured = {name: systems[name] for name, t in timings.items() if t.skipped is None}
        if measured:
            note(f"timing {', '.join(measured)} in turns at {res.height}x{res.width}")
            run = partial(pipeline_images, pipe, [prompt], [0], size, settings)
            for name, (seconds, peak) in time_systems(run, pipe, measured, timer).items():
                timings[name].seconds_per_image, timings[name].peak_bytes = seconds, peak
                last[name] = (timings[name].macs_per_image, seconds)
        report.sizes.append(SizeTiming(res.height, res.width, tiled, timings))
    report.crossover = {name: crossover_side(report.sizes, name) for name in MIXER_KINDS}
    return report


def _default_prompt(model: str) -> str:
    from .analyze import default_prompts
    from .demo import DEMO

    if str(model) == DEMO:
        return default_prompts(model)[0]
    return "a lighthouse on a cliff above a stormy sea, detailed oil painting"


def plot_end_to_end(report: EndToEndReport, path: Path) -> None:
    """PNG: seconds per image and peak memory against image side, one line per system, with the
    crossover sizes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"original": "original (self-attention)", **{n: k.label for n, k in MIXER_KINDS.items()}}
    styles = dict(zip(SYSTEMS, (("o", "-"), ("s", "--"), ("^", ":")), strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, attr, ylabel in (
        (axes[0], "seconds_per_image", "seconds per image"),
        (axes[1], "peak_bytes", "peak memory (MiB)"),
    ):
        for name in SYSTEMS:
            points = [
                (math.sqrt(s.height * s.width), getattr(s.systems[name], attr))
                for s in report.sizes
                if getattr(s.systems[name], attr) is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ys = [y / 2**20 for y in ys] if attr == "peak_bytes" else ys
                marker, line = styles.get(name, ("o", "-"))
                ax.plot(xs, ys, marker=marker, linestyle=line, label=labels[name])
        ax.set(xscale="log", yscale="log", xlabel="image side (pixels)", ylabel=ylabel)
        sides = [round(math.sqrt(s.height * s.width)) for s in report.sizes]
        ax.set_xticks(sides, [str(side) for side in sides], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    by_side: dict[int, list[str]] = {}
    for name, side in report.crossover.items():
        if side is not None:
            by_side.setdefault(side, []).append(MIXER_KINDS[name].label)
    for side, names in by_side.items():
        axes[0].axvline(side, color="grey", linestyle=":", alpha=0.7)
        axes[0].annotate(f"{' and '.join(names)} faster from {side} px", (side, axes[0].get_ylim()[1]),
                         rotation=90, va="top", ha="left", fontsize=8)  # fmt: skip
    axes[0].set_title(f"{report.model}: {report.steps} steps, guidance {report.guidance:g}, timed in turns")
    axes[1].set_title(f"on {report.device} ({report.dtype}); {report.memory}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
