"""A calibrated start: fit each new block's linear maps to the teacher's attention outputs.

With the blocks mounted and bypassed, the teacher denoises a few samples of the data at timesteps
spread over the schedule. At every ΔConvBlock the input grid ``x`` and the original attention's output
``y`` are seen together; ``proj_out`` and ``proj_global`` (with one bias) then solve the ridge least
squares ``y ≈ proj_out(local_features(x)) + proj_global(mean(x))`` over all those tokens, the block's
other weights kept as they are. Each block is fitted on the teacher's own inputs, independently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from .architectures import denoiser_of
from .block import DeltaConvBlock
from .conditioning import encode_prompts, latent_posterior, predict
from .data import image_tensor, open_data
from .errors import DeltaConvError
from .surgery import DeltaConvAdapter, ReplacedSelfAttention


@dataclass
class CalibrationReport:
    samples: int  # images
    timesteps: list[int]
    tokens: int  # token positions each block was fitted on, summed over its calls
    seconds: float
    # per block: ||block(x) - attention(x)||^2 / ||attention(x)||^2 over the calibration tokens
    error_before: dict[str, float]
    error_after: dict[str, float]

    def summary(self) -> str:
        """The mean relative error of the blocks against the attention outputs, before and after."""
        mean = {name: sum(errors.values()) / max(len(errors), 1)
                for name, errors in (("before", self.error_before), ("after", self.error_after))}  # fmt: skip
        return f"relative squared error of the blocks {mean['before']:.3f} -> {mean['after']:.3f}"


class _NormalEquations:
    """Running ``F^T F`` and ``F^T y`` of one block's features F = [local, mean(x), 1] and targets y."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | float = 0.0
        self.cross: torch.Tensor | float = 0.0
        self.energy = 0.0  # sum of y^2
        self.tokens = 0

    def add(self, block: DeltaConvBlock, x: torch.Tensor, y: torch.Tensor) -> None:
        local = block.local_features(x)  # (B, H, W, C'/2 per scale)
        mean = x.mean(dim=(1, 2), keepdim=True).expand_as(x)
        ones = torch.ones(*x.shape[:3], 1, device=x.device, dtype=x.dtype)
        features = torch.cat([local, mean, ones], dim=-1).flatten(0, 2).double()
        self.gram = self.gram + features.T @ features
        self.cross = self.cross + features.T @ y.flatten(0, 2).double()
        self.energy += float(y.double().square().sum())
        self.tokens += features.shape[0]

    def relative_error(self, block: DeltaConvBlock) -> float:
        """The block's squared error against the recorded outputs, relative to their energy."""
        w = torch.cat([block.proj_out.weight.T, block.proj_global.weight.T,
                       (block.proj_out.bias + block.proj_global.bias)[None]]).double()  # fmt: skip
        gram, cross = torch.as_tensor(self.gram), torch.as_tensor(self.cross)
        w = w.to(gram.device)
        residual = self.energy - 2 * float((w * cross).sum()) + float((w * (gram @ w)).sum())
        return max(residual, 0.0) / max(self.energy, 1e-30)

    @torch.no_grad()
    def solve_into(self, block: DeltaConvBlock, ridge: float) -> None:
        gram = torch.as_tensor(self.gram)
        damping = ridge * torch.trace(gram) / gram.shape[0]
        identity = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        weights = torch.linalg.solve(gram + damping * identity, torch.as_tensor(self.cross))
        local = block.proj_out.in_features
        block.proj_out.weight.copy_(weights[:local].T)
        block.proj_out.bias.zero_()
        block.proj_global.weight.copy_(weights[local : local + block.channels].T)
        block.proj_global.bias.copy_(weights[-1])


@torch.no_grad()
def calibrate(
    pipe: Any,
    adapter: DeltaConvAdapter,
    data: str,
    resolution: int,
    *,
    samples: int = 32,
    timesteps: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    ridge: float = 1e-5,
    on_progress: Callable[[str], None] | None = None,
) -> CalibrationReport:
    """Fit the mounted ΔConv blocks' ``proj_out`` and ``proj_global`` to the teacher's attention outputs
    on ``samples`` images of ``data`` (an imagefolder or ``demo``) at ``timesteps`` noise levels."""
    if adapter.config.mixer != "deltaconv":
        raise DeltaConvError(f"calibration fits ΔConv blocks, not {adapter.config.mixer}")
    if not adapter.is_mounted:
        raise DeltaConvError("calibration needs the adapter mounted on the pipeline")
    began = time.perf_counter()
    note = on_progress or (lambda message: None)
    denoiser = denoiser_of(pipe)
    dataset = open_data(data, seed)
    samples = min(samples, len(dataset))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    last = scheduler.config.num_train_timesteps - 1
    levels = [int(t) for t in np.linspace(0.02 * last, 0.98 * last, timesteps).round()]
    equations: dict[str, _NormalEquations] = {}

    def record(wrapper: ReplacedSelfAttention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        batch, tokens, channels = output.shape
        grid = (batch, *wrapper.grid.size, channels)
        x = args[0].reshape(grid).to(next(wrapper.block.parameters()).dtype)
        equations.setdefault(wrapper.site_name, _NormalEquations()).add(
            wrapper.block, x, output.reshape(grid).to(x.dtype)
        )

    wrappers = [m for m in denoiser.modules() if isinstance(m, ReplacedSelfAttention)]
    hooks = [w.register_forward_hook(record, with_kwargs=True) for w in wrappers]
    generator = torch.Generator().manual_seed(seed)
    try:
        with adapter.bypassed():
            for start in range(0, samples, batch_size):
                chosen = [dataset[i] for i in range(start, min(start + batch_size, samples))]
                images = torch.stack([image_tensor(s.image, resolution) for s in chosen])
                posterior = latent_posterior(pipe, images)
                latents = posterior.mode().float().to(denoiser.device) * pipe.vae.config.scaling_factor
                cond = encode_prompts(pipe, [s.caption for s in chosen], resolution, resolution)
                for level in levels:
                    note(f"calibrating: images {start + 1}-{start + len(chosen)} of {samples}, t = {level}")
                    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
                    t = torch.full((len(chosen),), level, device=latents.device)
                    noisy = scheduler.add_noise(latents, noise, t).to(denoiser.dtype)
                    predict(denoiser, noisy, t, cond)
    finally:
        for hook in hooks:
            hook.remove()
    before, after = {}, {}
    for wrapper in wrappers:
        fit = equations[wrapper.site_name]
        before[wrapper.site_name] = fit.relative_error(wrapper.block)
        fit.solve_into(wrapper.block, ridge)
        after[wrapper.site_name] = fit.relative_error(wrapper.block)
    tokens = equations[wrappers[0].site_name].tokens if wrappers else 0
    return CalibrationReport(samples, levels, tokens, time.perf_counter() - began, before, after)
