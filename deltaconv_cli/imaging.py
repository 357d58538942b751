"""Image grids and image metrics shared by distill's report, sample and eval."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` float image in [0, 1] (a pipeline's ``output_type="np"``) as uint8."""
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


CHAR_W, LINE_H = 6, 12  # PIL's default bitmap font


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: Path,
    column_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    scale: int = 1,
) -> None:
    """Write uint8 images as a labelled grid PNG (rows x columns; cells may differ in size).

    Each row's label is written above it, wrapped to the grid's width, so the images keep the width."""
    cell_h = max(img.shape[0] for row in rows for img in row) * scale
    cell_w = max(img.shape[1] for row in rows for img in row) * scale
    columns = max(len(row) for row in rows)
    width = columns * (cell_w + 2)
    header = LINE_H + 4 if column_labels else 0
    wrapped = [
        textwrap.wrap(label, max(8, width // CHAR_W - 1))[:3] if r < len(row_labels) else []
        for r, label in enumerate([*row_labels, *[""] * (len(rows) - len(row_labels))][: len(rows)])
    ]
    label_h = [len(lines) * LINE_H + 4 if lines else 0 for lines in wrapped]
    canvas = Image.new("RGB", (width, header + sum(label_h) + len(rows) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((c * (cell_w + 2) + 2, 2), label[: (cell_w - 2) // CHAR_W], fill="black")
    top = header
    for row, lines, above in zip(rows, wrapped, label_h, strict=True):
        for i, line in enumerate(lines):
            draw.text((2, top + 2 + i * LINE_H), line, fill=(60, 60, 60))
        top += above
        for c, img in enumerate(row):
            tile = Image.fromarray(img)
            if scale != 1:
                tile = tile.resize((img.shape[1] * scale, img.shape[0] * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (c * (cell_w + 2), top))
        top += cell_h + 2
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
