"""Image-caption data for distillation: a Hugging Face imagefolder, or the embedded demo domain.

An imagefolder holds images and a ``metadata.jsonl`` whose lines are ``{"file_name": ..., "text": ...}``
(the convention of ``datasets.load_dataset("imagefolder")``). It is checked line by line up front so that
a bad line is reported by number before any training starts.

Batches are addressed by step: the global batch of step ``s`` is a fixed list of sample indices (a
seeded permutation per epoch), so a resumed run and a run split over several processes see exactly the
samples an uninterrupted single-process run sees.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .demo import DEMO
from .errors import DeltaConvError
from .runtime import read_text_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str


class ImageFolderData:
    """Image-caption pairs listed in ``folder/metadata.jsonl``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DeltaConvError(f"data folder {folder} does not exist")
        metadata = self.folder / "metadata.jsonl"
        if not metadata.is_file():
            raise DeltaConvError(
                f"{folder} has no metadata.jsonl; expected lines like "
                '{"file_name": "0001.png", "text": "a caption"}'
            )
        self.entries: list[tuple[Path, str]] = []
        for number, line in enumerate(read_text_file(metadata).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, text = record["file_name"], record["text"]
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise DeltaConvError(
                    f"{metadata} line {number}: expected a JSON object with string file_name and text"
                ) from None
            if not (self.folder / name).is_file():
                raise DeltaConvError(f"{metadata} line {number}: image {name} not found in {folder}")
            self.entries.append((self.folder / name, text))
        if not self.entries:
            raise DeltaConvError(f"{metadata} lists no images")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        path, text = self.entries[index]
        try:
            with Image.open(path) as image:
                return Sample(image.convert("RGB"), text)
        except (OSError, UnidentifiedImageError) as err:
            raise DeltaConvError(f"cannot read image {path}: {err}") from None


class DemoData:
    """The embedded domain's generator: scene ``index`` of data set ``seed`` (unbounded)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return 2**31 - 1  # unbounded in practice; every index is a fresh scene

    def __getitem__(self, index: int) -> Sample:
        from .demo import domain

        scene = domain.make_scene(self.seed, index)
        return Sample(Image.fromarray(domain.render(scene)), scene.caption)


def open_data(spec: str | Path, seed: int = 0) -> ImageFolderData | DemoData:
    """``"demo"`` (the embedded domain, scenes drawn from ``seed``) or an imagefolder path."""
    return DemoData(seed) if str(spec) == DEMO else ImageFolderData(Path(spec))


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, length: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(length)


def batch_indices(step: int, batch_size: int, length: int, seed: int) -> list[int]:
    """Sample indices of the global batch of ``step``: consecutive slices of a seeded permutation per
    epoch (the demo stream, whose length is unbounded, is read in order)."""
    if length >= 2**31 - 1:
        return list(range(step * batch_size, (step + 1) * batch_size))
    positions = (divmod(p, length) for p in range(step * batch_size, (step + 1) * batch_size))
    return [int(_epoch_order(seed, epoch, length)[offset]) for epoch, offset in positions]


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """``(3, R, R)`` in [-1, 1]: resized so the shorter side is R, then centre-cropped."""
    fitted = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(fitted, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
