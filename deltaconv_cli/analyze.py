"""``deltaconv analyze``: how local is each self-attention layer (the observation behind docs/method.md §1)?

A recording attention processor on every self-attention computes the layer's output as usual and, for a
sample of query positions (in chunks, so memory stays bounded), the head-averaged attention map. The
maps are reduced on the fly into histograms over the 2-D distance between query and key, per layer and
timestep band; from them come the decay curve, the radii holding 50/90/99 % of the mass (next to a
uniform map's), a power-law fit with a constant floor (the global part), the share of attention inside
the ΔConvBlock's receptive field, and a recommended kernel size per stage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .architectures import denoiser_of
from .errors import DeltaConvError
from .loading import locate_model
from .runtime import check_seeds
from .surgery import attach_token_grids, default_kernel_sizes, find_self_attention_sites

WINDOW = 12  # the mean pattern around a query is kept for offsets up to this many tokens
CUMULATIVE_LEVELS = (0.5, 0.9, 0.99)
KERNEL_CHOICES = (3, 5, 7, 9, 11, 13, 15)


def short_name(site: str) -> str:
    """``down_blocks.0.attentions.1`` for ``down_blocks.0.attentions.1.transformer_blocks.0.attn1``."""
    return site.replace(".transformer_blocks.0", "").replace(".transformer_blocks", "").replace(".attn1", "")


def delta_conv_reach(kernel_size: int) -> int:
    """Chebyshev radius (tokens) a ΔConvBlock mixes over: the half-scale branch's k x k convolution on
    the 2x pooled grid, upsampled back, reaches 2 (k // 2) + 1 positions from the query."""
    return 2 * (kernel_size // 2) + 1


class LocalityStats:
    """Attention mass accumulated by Euclidean and Chebyshev distance, and by offset near the query."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        bins = math.ceil(math.hypot(height, width)) + 2
        self.radial_mass = torch.zeros(bins, dtype=torch.float64)
        self.radial_pairs = torch.zeros(bins, dtype=torch.float64)
        self.cheb_mass = torch.zeros(max(height, width) + 1, dtype=torch.float64)
        self.cheb_pairs = torch.zeros(max(height, width) + 1, dtype=torch.float64)
        side = 2 * WINDOW + 1
        self.window_mass = torch.zeros(side * side, dtype=torch.float64)
        self.window_pairs = torch.zeros(side * side, dtype=torch.float64)
        self.queries = 0
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        self.key_y, self.key_x = ys.flatten(), xs.flatten()

    def add(self, probs: torch.Tensor, query_index: torch.Tensor) -> None:
        """Add a ``(Q, N)`` head-averaged attention map for the queries at flat positions ``query_index``."""
        probs = probs.double().cpu()
        query_index = query_index.cpu()
        dy = self.key_y[None, :] - self.key_y[query_index][:, None]
        dx = self.key_x[None, :] - self.key_x[query_index][:, None]
        radial = torch.sqrt((dy * dy + dx * dx).double()).round().long().flatten()
        cheb = torch.maximum(dy.abs(), dx.abs()).flatten()
        weights = probs.flatten()
        self.radial_mass += torch.bincount(radial, weights, minlength=len(self.radial_mass))
        self.radial_pairs += torch.bincount(radial, minlength=len(self.radial_pairs)).double()
        self.cheb_mass += torch.bincount(cheb, weights, minlength=len(self.cheb_mass))
        self.cheb_pairs += torch.bincount(cheb, minlength=len(self.cheb_pairs)).double()
        near = (dy.abs() <= WINDOW) & (dx.abs() <= WINDOW)
        offsets = ((dy + WINDOW) * (2 * WINDOW + 1) + dx + WINDOW)[near]
        self.window_mass += torch.bincount(offsets, probs[near], minlength=len(self.window_mass))
        self.window_pairs += torch.bincount(offsets, minlength=len(self.window_pairs)).double()
        self.queries += len(query_index)


@dataclass
class LayerLocality:
    name: str
    stage: str
    band: str
    grid: tuple[int, int]
    queries: int  # query positions the statistics come from
    decay: list[float]  # mean attention weight per key at distance r = 0, 1, 2, ... (tokens)
    cumulative: list[float]  # share of the mass within distance r
    radii: dict[str, float]  # distance holding 50 / 90 / 99 % of the mass
    uniform_radii: dict[str, float]  # the same for a uniform map on this grid
    power_law_exponent: float | None  # alpha of the local part, mean weight ~ r^-alpha
    power_law_r2: float | None  # quality of that fit (R^2 in log-log)
    global_share: float  # mass a constant floor spreads over the whole grid
    kernel_size: int  # the ΔConvBlock's kernel at this stage
    delta_conv_coverage: float  # mass inside its receptive field (both scales)
    recommended_kernel_size: int  # smallest window holding 90 % of the mass above the uniform floor
    local: bool  # r90 below half of the uniform map's, and most mass outside the global floor
    pattern: list[list[float]] = field(repr=False)  # mean weight by offset (dy, dx) within WINDOW


def _radius(cumulative: np.ndarray, level: float) -> float:
    """Distance at which the cumulative mass reaches ``level``. Bin r holds distances in [r - 1/2, r + 1/2)
    (distances are rounded), so the crossing is interpolated linearly inside the bin that reaches it."""
    above = np.nonzero(cumulative >= level - 1e-12)[0]
    if not len(above):
        return float(len(cumulative) - 1)
    r = int(above[0])
    low = cumulative[r - 1] if r > 0 else 0.0
    start = max(r - 0.5, 0.0)
    return float(start + (r + 0.5 - start) * (level - low) / max(cumulative[r] - low, 1e-12))


def summarize(stats: LocalityStats, name: str, stage: str, band: str, kernel_size: int,
              local_share: float = 0.9) -> LayerLocality:  # fmt: skip
    """Decay, radii, power-law fit, global floor, ΔConv coverage and kernel recommendation of one layer
    (the smallest kernel whose receptive field holds ``local_share`` of the mass above the floor)."""
    mass = stats.radial_mass.numpy()
    pairs = stats.radial_pairs.numpy()
    total = mass.sum()
    used = pairs > 0
    decay = np.where(used, mass / np.maximum(pairs, 1), 0.0)
    cumulative = np.cumsum(mass) / total
    uniform = np.cumsum(pairs) / pairs.sum()
    radii = {f"r{int(level * 100)}": _radius(cumulative, level) for level in CUMULATIVE_LEVELS}
    uniform_radii = {f"r{int(level * 100)}": _radius(uniform, level) for level in CUMULATIVE_LEVELS}

    # The global part: a constant floor, estimated from the farthest quarter of the occupied distances.
    distances = np.nonzero(used)[0]
    far = distances[distances >= np.quantile(distances, 0.75)]
    floor = float(np.median(decay[far])) if len(far) else 0.0
    n_tokens = stats.height * stats.width
    global_share = min(1.0, floor * n_tokens)
    local = decay - floor
    # Fit the decay where it stands clear of the floor: from distance 1 out to the 90 % radius.
    reach = max(4, math.ceil(radii["r90"]))
    fit_r = distances[(distances >= 1) & (distances <= reach) & (local[distances] > floor)]
    exponent = r2 = None
    if len(fit_r) >= 3:
        x, y = np.log(fit_r), np.log(local[fit_r])
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (slope * x + intercept)
        spread = ((y - y.mean()) ** 2).sum()
        exponent, r2 = float(-slope), float(1 - (residual**2).sum() / spread) if spread > 0 else 1.0

    cheb_cumulative = np.cumsum(stats.cheb_mass.numpy()) / stats.cheb_mass.sum().item()

    def coverage(k: int) -> float:
        return float(cheb_cumulative[min(delta_conv_reach(k), len(cheb_cumulative) - 1)])

    # The uniform floor is the pooling branch's job; the kernel is sized for what lies above it: the
    # smallest window holding `local_share` of the local mass (any kernel, when there is none).
    local_cheb = np.clip(stats.cheb_mass.numpy() - floor * stats.cheb_pairs.numpy(), 0.0, None)
    recommended = KERNEL_CHOICES[0]
    if local_cheb.sum() > 1e-9 * stats.cheb_mass.sum().item():
        local_cumulative = np.cumsum(local_cheb) / local_cheb.sum()

        def local_coverage(k: int) -> float:
            return float(local_cumulative[min(delta_conv_reach(k), len(local_cumulative) - 1)])

        recommended = next(
            (k for k in KERNEL_CHOICES if local_coverage(k) >= local_share - 1e-9), KERNEL_CHOICES[-1]
        )
    side = 2 * WINDOW + 1
    pattern = (stats.window_mass / stats.window_pairs.clamp(min=1)).reshape(side, side)
    return LayerLocality(
        name=name,
        stage=stage,
        band=band,
        grid=(stats.height, stats.width),
        queries=stats.queries,
        decay=decay.tolist(),
        cumulative=cumulative.tolist(),
        radii=radii,
        uniform_radii=uniform_radii,
        power_law_exponent=exponent,
        power_law_r2=r2,
        global_share=global_share,
        kernel_size=kernel_size,
        delta_conv_coverage=coverage(kernel_size),
        recommended_kernel_size=recommended,
        local=radii["r90"] < 0.5 * uniform_radii["r90"] and global_share < 0.5,
        pattern=pattern.tolist(),
    )


ScoreFunction = Callable[[tuple[int, int], torch.Tensor], torch.Tensor]


class RecordingAttnProcessor:
    """Computes self-attention as diffusers' SDPA processor does, and records the head-averaged maps of a
    sample of queries into the statistics of the current timestep band.

    ``score_override(grid, query_index) -> (Q, N)`` replaces the maps (not the output) with a known one:
    how tests inject synthetic attention through the same path.
    """

    def __init__(
        self, recorder: LocalityRecorder, name: str, grid: Any, score_override: ScoreFunction | None = None
    ):
        self.recorder, self.name, self.grid = recorder, name, grid
        self.score_override = score_override
        self.inner = AttnProcessor2_0()

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        out = self.inner(attn, hidden_states, *args, **kwargs)
        band = self.recorder.current_band
        if band is not None and hidden_states.ndim == 3:
            self._record(attn, hidden_states, band)
        return out

    @torch.no_grad()
    def _record(self, attn: Attention, hidden: torch.Tensor, band: str) -> None:
        height, width = self.grid.size
        n = height * width
        stats = self.recorder.stats_for(self.name, band, height, width)
        query_index = self.recorder.sample_queries(n)
        if self.score_override is not None:
            stats.add(self.score_override((height, width), query_index), query_index)
            return
        batch = hidden.shape[0]
        q = attn.to_q(hidden).view(batch, n, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(hidden).view(batch, n, attn.heads, -1).transpose(1, 2)
        scale = attn.scale
        for start in range(0, len(query_index), self.recorder.chunk):
            chunk = query_index[start : start + self.recorder.chunk].to(hidden.device)
            scores = (q[:, :, chunk].float() @ k.float().transpose(-1, -2)) * scale
            probs = scores.softmax(dim=-1).mean(dim=(0, 1))  # over the batch (CFG halves) and heads
            stats.add(probs, chunk)


class LocalityRecorder:
    """Per (layer, timestep band) statistics, the current band (set from the denoiser's timestep), and
    the query sampling."""

    def __init__(
        self, band_edges: Sequence[int], num_train_timesteps: int, queries: int, chunk: int, seed: int
    ):
        edges = [0, *sorted(band_edges), num_train_timesteps]
        self.bands = [(lo, hi) for lo, hi in zip(edges, edges[1:], strict=False) if hi > lo]
        self.queries, self.chunk = queries, chunk
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: dict[tuple[str, str], LocalityStats] = {}
        self.current_band: str | None = None

    @staticmethod
    def band_name(lo: int, hi: int) -> str:
        return f"t{lo}-{hi}"

    def set_timestep(self, timestep: float) -> None:
        self.current_band = next(
            (self.band_name(lo, hi) for lo, hi in self.bands if lo <= timestep < hi),
            self.band_name(*self.bands[-1]),
        )

    def stats_for(self, name: str, band: str, height: int, width: int) -> LocalityStats:
        key = (name, band)
        if key not in self.stats:
            self.stats[key] = LocalityStats(height, width)
        return self.stats[key]

    def sample_queries(self, n: int) -> torch.Tensor:
        if self.queries >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)[: self.queries]


@dataclass
class AnalysisReport:
    model: str
    height: int
    width: int
    prompts: list[str]
    steps: int
    guidance: float
    guidance_start: float
    bands: list[str]
    queries_per_call: int
    layers: list[LayerLocality]
    recommended_kernel_sizes: dict[str, int]
    current_kernel_sizes: dict[str, int]


def attach_recorder(
    denoiser: Any, recorder: LocalityRecorder, layers: Sequence[str] | None = None,
    score_override: ScoreFunction | None = None,
) -> Callable[[], None]:  # fmt: skip
    """Put recording processors on the self-attention sites (all, or those whose name or stage is in
    ``layers``); returns a function that restores the original processors."""
    sites = find_self_attention_sites(denoiser)
    if layers:
        known = {s.name for s in sites} | {s.stage for s in sites}
        unknown = sorted(set(layers) - known)
        if unknown:
            stages = ", ".join(sorted({s.stage for s in sites}))
            raise DeltaConvError(f"unknown layer or stage {unknown[0]!r}; stages: {stages}")
        sites = [s for s in sites if s.name in layers or s.stage in layers]
    grids, handles = attach_token_grids(denoiser, sites)
    originals = {}
    for site in sites:
        attn = denoiser.get_submodule(site.name)
        originals[site.name] = attn.processor
        attn.set_processor(
            RecordingAttnProcessor(recorder, site.name, grids[site.grid_source], score_override)
        )

    def timestep_hook(module: Any, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        recorder.set_timestep(float(torch.as_tensor(t).flatten()[0]))

    handles.append(denoiser.register_forward_pre_hook(timestep_hook, with_kwargs=True))

    def detach() -> None:
        for handle in handles:
            handle.remove()
        for name, processor in originals.items():
            denoiser.get_submodule(name).set_processor(processor)

    return detach


def default_prompts(model: str) -> list[str]:
    """Prompts for an analysis nobody gave prompts to: on the demo, a layout and a count caption."""
    from .demo import DEMO

    if str(model) != DEMO:
        raise DeltaConvError("no prompts given: analyze needs prompts for this model")
    return ["a red circle at the top left and a blue square at the bottom right", "three green triangles"]


def analyze(
    model: str,
    prompts: Sequence[str] = (),
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    guidance: float | None = None,
    guidance_start: float | None = None,
    band_edges: Sequence[int] = (333, 666),
    layers: Sequence[str] | None = None,
    queries: int = 256,
    chunk: int = 256,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    score_override: ScoreFunction | None = None,
) -> AnalysisReport:
    """Sample ``prompts`` (on the demo, by default two captions with placed objects) with the original
    model while recording its self-attention locality; ``guidance`` and ``guidance_start`` default to the
    model's own."""
    from .sampling import SampleSettings, generate, load_for_sampling, resolve_size

    given = SampleSettings(steps, guidance, height, width, guidance_start=guidance_start)
    given.check()
    for name, value in (("queries", queries), ("chunk", chunk)):
        if value < 1:
            raise DeltaConvError(f"{name} must be at least 1, got {value}")
    timesteps = locate_model(model).train_timesteps
    outside = [edge for edge in band_edges if not 0 < edge < timesteps]
    if outside:
        raise DeltaConvError(f"timestep band edges must lie in 1..{timesteps - 1}, got {outside[0]}")
    prompts = list(prompts) or default_prompts(model)
    check_seeds(range(seed, seed + len(prompts)))
    given.check_model(model, "analysis")
    settings = given.for_model(model)
    loaded = load_for_sampling(model, None, device, dtype)
    if loaded.adapter is not None:
        loaded.adapter.unmount()  # analyse the original attention
    pipe = loaded.pipe
    denoiser = denoiser_of(pipe)
    size = resolve_size(loaded, height, width)
    recorder = LocalityRecorder(band_edges, pipe.scheduler.config.num_train_timesteps, queries, chunk, seed)
    detach = attach_recorder(denoiser, recorder, layers, score_override)
    try:
        generate(pipe, prompts, list(range(seed, seed + len(prompts))), size, settings)
    finally:
        detach()
    kernels = default_kernel_sizes(denoiser)
    stage_of = {s.name: s.stage for s in find_self_attention_sites(denoiser)}
    results = [
        summarize(stats, name, stage_of[name], band, kernels[stage_of[name]])
        for (name, band), stats in sorted(recorder.stats.items())
    ]
    recommended: dict[str, int] = {}
    for result in results:
        recommended[result.stage] = max(recommended.get(result.stage, 0), result.recommended_kernel_size)
    return AnalysisReport(
        str(model), *size, list(prompts), steps, settings.guidance, settings.guidance_start,
        [LocalityRecorder.band_name(lo, hi) for lo, hi in recorder.bands], queries, results, recommended,
        {stage: kernels[stage] for stage in recommended},
    )  # fmt: skip


def write_outputs(report: AnalysisReport, out: Path) -> dict[str, Path]:
    """analysis.json (every number), kernel_sizes.json (for convert --kernel-sizes) and three PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("analysis.json", "kernel_sizes.json", "decay.png", "patterns.png",
                                           "summary.png")}  # fmt: skip
    paths["analysis.json"].write_text(json.dumps(asdict(report), indent=1) + "\n")
    kernel_file = {
        "kernel_sizes": report.recommended_kernel_sizes,
        "source": f"deltaconv analyze {report.model}",
    }
    paths["kernel_sizes.json"].write_text(json.dumps(kernel_file, indent=2) + "\n")

    bands = report.bands
    fig, axes = plt.subplots(1, len(bands), figsize=(5 * len(bands), 4), squeeze=False)
    for ax, band in zip(axes[0], bands, strict=True):
        for layer in (x for x in report.layers if x.band == band):
            decay = np.array(layer.decay)
            r = np.nonzero(decay > 0)[0]
            r = r[r >= 1]
            ax.plot(
                r, decay[r], lw=1, label=f"{layer.name.split('.attn1')[0]} {layer.grid[0]}x{layer.grid[1]}"
            )
        ax.set(
            xscale="log", yscale="log", xlabel="distance (tokens)", ylabel="mean attention weight", title=band
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(paths["decay.png"], dpi=120)
    plt.close(fig)

    averaged = {}
    for layer in report.layers:
        averaged.setdefault(layer.name, []).append(np.array(layer.pattern))
    columns = min(4, len(averaged))
    rows = math.ceil(len(averaged) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, patterns) in zip(axes.flat, averaged.items(), strict=False):
        pattern = np.mean(patterns, axis=0)
        ax.imshow(
            np.log10(np.maximum(pattern, 1e-8)), cmap="magma", extent=(-WINDOW, WINDOW, WINDOW, -WINDOW)
        )
        ax.set_title(short_name(name), fontsize=6)
        ax.axis("on")
        ax.tick_params(labelsize=5)
    fig.suptitle("mean attention around a query (log10 weight, offsets in tokens)", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["patterns.png"], dpi=120)
    plt.close(fig)

    names = list(averaged)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(names)), 6), sharex=True)
    x = np.arange(len(names))

    def per_layer(value: Callable[[LayerLocality], float]) -> list[float]:
        return [float(np.mean([value(layer) for layer in report.layers if layer.name == n])) for n in names]

    ax1.bar(x - 0.2, per_layer(lambda layer: layer.radii["r90"]), 0.4, label="r90")
    ax1.bar(x + 0.2, per_layer(lambda layer: layer.uniform_radii["r90"]), 0.4, label="r90 of a uniform map")
    ax1.set(ylabel="tokens")
    ax1.legend(fontsize=7)
    ax2.bar(x - 0.2, per_layer(lambda layer: layer.delta_conv_coverage), 0.4, label="ΔConv window coverage")
    ax2.bar(x + 0.2, per_layer(lambda layer: layer.global_share), 0.4, label="global (uniform) share")
    ax2.set(ylabel="share of attention", ylim=(0, 1))
    ax2.legend(fontsize=7)
    ax2.set_xticks(x, [short_name(n) for n in names], rotation=60, fontsize=6, ha="right")
    fig.tight_layout()
    fig.savefig(paths["summary.png"], dpi=120)
    plt.close(fig)
    return paths
