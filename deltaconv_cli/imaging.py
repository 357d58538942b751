"""Image grids and image metrics shared by distill's report, sample and eval."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` float image in [0, 1] (a pipeline's ``output_type="np"``) as uint8."""
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: Path,
    column_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    scale: int = 1,
) -> None:
    """Write uint8 images as a labelled grid PNG (rows x columns; cells may differ in size)."""
    cell_h = max(img.shape[0] for row in rows for img in row) * scale
    cell_w = max(img.shape[1] for row in rows for img in row) * scale
    header = 16 if column_labels else 0
    label_w = 8 + 6 * max((len(label) for label in row_labels), default=0) if row_labels else 0
    label_w = min(label_w, 420)
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (label_w + columns * (cell_w + 2), header + len(rows) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * (cell_w + 2) + 2, 2), label, fill="black")
    for r, row in enumerate(rows):
        top = header + r * (cell_h + 2)
        if r < len(row_labels):
            draw.text((2, top + cell_h // 2 - 6), row_labels[r][:70], fill="black")
        for c, img in enumerate(row):
            tile = Image.fromarray(img)
            if scale != 1:
                tile = tile.resize((img.shape[1] * scale, img.shape[0] * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (cell_w + 2), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _as_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 255


def psnr(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Mean PSNR (dB) over pairs of uint8 images; identical pairs give +inf."""
    values = [
        float(peak_signal_noise_ratio(_as_batch([x]), _as_batch([y]), data_range=1.0))
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.mean(values))


def ssim(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Mean SSIM over pairs of uint8 images (Gaussian window 11, as in Wang et al. 2004)."""
    return float(structural_similarity_index_measure(_as_batch(a), _as_batch(b), data_range=1.0))
