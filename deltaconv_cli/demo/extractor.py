"""A small feature extractor for the demo domain, so Fréchet distances can be computed offline.

It is a CNN trained to name, for each of the 3 x 3 cells, the colour and the shape there (or none);
its 64-d embedding before the classification heads is the feature used for Fréchet distances.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from rich.progress import Progress
from torch import nn

from ..progress import advance
from . import domain

_N_COLORS = len(domain.COLORS) + 1  # + none
_N_SHAPES = len(domain.SHAPES) + 1
_CELLS = domain.GRID * domain.GRID


class DomainFeatureExtractor(ModelMixin, ConfigMixin):
    """CNN over 64 x 64 RGB images in [0, 1]: per-cell colour and shape logits, and a feature vector."""

    @register_to_config
    def __init__(self, width: int = 32, features: int = 64) -> None:
        super().__init__()

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *conv(3, width, 2),
            *conv(width, 2 * width, 2),
            *conv(2 * width, 4 * width, 2),
            *conv(4 * width, 4 * width, 1),
        )
        self.embed = nn.Linear(4 * width * _CELLS, features)
        self.heads = nn.Linear(features, _CELLS * (_N_COLORS + _N_SHAPES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, features)`` for ``(N, 3, H, W)`` images in [0, 1] (resized to 64 x 64 if needed)."""
        if images.shape[-2:] != (domain.SIZE, domain.SIZE):
            images = F.interpolate(images, size=(domain.SIZE, domain.SIZE), mode="bilinear", antialias=True)
        grid = F.adaptive_avg_pool2d(self.body(images * 2 - 1), domain.GRID)
        return self.embed(grid.flatten(1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour logits ``(N, 9, 7)`` and shape logits ``(N, 9, 4)`` per cell."""
        logits = self.heads(self.features(images)).view(-1, _CELLS, _N_COLORS + _N_SHAPES)
        return logits[..., :_N_COLORS], logits[..., _N_COLORS:]


def cell_labels(scene: domain.Scene) -> tuple[np.ndarray, np.ndarray]:
    """Colour and shape class of each cell (0 = empty)."""
    colors, shapes = np.zeros(_CELLS, dtype=np.int64), np.zeros(_CELLS, dtype=np.int64)
    for o in scene.objects:
        colors[o.cell] = list(domain.COLORS).index(o.color) + 1
        shapes[o.cell] = domain.SHAPES.index(o.shape) + 1
    return colors, shapes


def scene_batch(seed: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scenes = [domain.make_scene(seed, i) for i in range(start, start + count)]
    images = torch.from_numpy(np.stack([domain.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    labels = [cell_labels(s) for s in scenes]
    colors = torch.from_numpy(np.stack([c for c, _ in labels]))
    shapes = torch.from_numpy(np.stack([s for _, s in labels]))
    return images, colors, shapes


def train_extractor(seed: int, steps: int, progress: Progress, batch: int = 64) -> DomainFeatureExtractor:
    torch.manual_seed(seed)
    model = DomainFeatureExtractor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    task = progress.add_task("feature extractor", total=steps, status="")
    for step in range(steps):
        images, colors, shapes = scene_batch(seed, step * batch, batch)
        color_logits, shape_logits = model(images)
        loss = F.cross_entropy(color_logits.flatten(0, 1), colors.flatten()) + F.cross_entropy(
            shape_logits.flatten(0, 1), shapes.flatten()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        advance(progress, task, f"loss {loss.item():.4f}")
    return model.eval()
