"""The embedded demo domain: seeded, captioned 64 x 64 scenes of coloured shapes, and their exact checker.

A scene is a light background with one to four objects on a 3 x 3 grid of cells. Four kinds:

- ``single``: "a red circle at the top left"
- ``pair``: "a red circle at the top left and a blue square at the bottom right"
- ``count``: "three green triangles" (cells chosen at random: the number must come out exact)
- ``mirror``: "two yellow squares mirrored" (same row, left and right columns, row at random: the two
  halves of the image must agree)

``count`` and ``mirror`` depend on distant parts of the image agreeing, where removing global attention
could hurt. The checker reads the rules back from the pixels (colour classes, connected components,
cells, shape by fill ratio, mirror agreement) and scores an image against its caption in [0, 1], naming
why each fact that fails does (:func:`facts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

SIZE = 64
GRID = 3
CELL = SIZE / GRID

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (145, 55, 190),
    "cyan": (30, 190, 205),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = (  # row-major over the 3 x 3 grid
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
NUMBERS = {2: "two", 3: "three", 4: "four"}
KINDS = ("single", "pair", "count", "mirror")
KIND_WEIGHTS = (0.25, 0.35, 0.2, 0.2)

# Fill ratio of a shape in its bounding box: square 1, disc pi/4, upright triangle 1/2.
_SQUARE_MIN_FILL, _CIRCLE_MIN_FILL = 0.88, 0.64
_MIN_COMPONENT = 10  # pixels; smaller specks are noise, not objects
_MAX_COLOR_DISTANCE = 95.0  # a pixel this far from every object colour is background


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    cell: int  # 0..8, row-major
    radius: float = 8.0  # half the object's width in pixels
    offset: tuple[float, float] = (0.0, 0.0)  # (dy, dx) jitter from the cell centre


@dataclass(frozen=True)
class Scene:
    kind: str
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int] = (240, 240, 240)
    caption: str = field(default="", compare=False)


def _position_phrase(cell: int) -> str:
    return "in the center" if cell == 4 else f"at the {POSITIONS[cell]}"


def caption_of(kind: str, objects: tuple[SceneObject, ...]) -> str:
    """The caption of a scene; :func:`parse_caption` inverts it."""
    first = objects[0]
    if kind == "single":
        return f"a {first.color} {first.shape} {_position_phrase(first.cell)}"
    if kind == "pair":
        second = objects[1]
        return (
            f"a {first.color} {first.shape} {_position_phrase(first.cell)} "
            f"and a {second.color} {second.shape} {_position_phrase(second.cell)}"
        )
    if kind == "count":
        return f"{NUMBERS[len(objects)]} {first.color} {first.shape}s"
    if kind == "mirror":
        return f"two {first.color} {first.shape}s mirrored"
    raise ValueError(f"unknown scene kind {kind!r}")


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` of the data set ``seed`` (independent of every other)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> Scene:
    """A random scene (of ``kind``, or of a kind drawn with KIND_WEIGHTS)."""
    kind = kind or str(rng.choice(KINDS, p=KIND_WEIGHTS))
    colors, shapes = list(COLORS), list(SHAPES)

    def obj(color: str, shape: str, cell: int) -> SceneObject:
        radius = float(rng.uniform(7.0, 8.5))
        offset = (float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-1.5, 1.5)))
        return SceneObject(color, shape, int(cell), radius, offset)

    if kind == "single":
        objects = (obj(rng.choice(colors), rng.choice(shapes), rng.integers(GRID * GRID)),)
    elif kind == "pair":
        cells = rng.choice(GRID * GRID, size=2, replace=False)
        objects = tuple(obj(rng.choice(colors), rng.choice(shapes), c) for c in cells)
    elif kind == "count":
        count = int(rng.integers(2, 5))
        color, shape = rng.choice(colors), rng.choice(shapes)
        cells = sorted(rng.choice(GRID * GRID, size=count, replace=False))
        objects = tuple(obj(color, shape, c) for c in cells)
    elif kind == "mirror":
        color, shape, row = rng.choice(colors), rng.choice(shapes), int(rng.integers(GRID))
        left = obj(color, shape, row * GRID)
        # The right object is the exact mirror image of the left one.
        right = SceneObject(
            color, shape, row * GRID + GRID - 1, left.radius, (left.offset[0], -left.offset[1])
        )
        objects = (left, right)
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    objects = tuple(SceneObject(str(o.color), str(o.shape), o.cell, o.radius, o.offset) for o in objects)
    tone = int(rng.integers(225, 250))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(tone + t, 0, 255)) for t in tint)
    return Scene(kind, objects, background, caption_of(kind, objects))


def make_scene(seed: int, index: int, kind: str | None = None) -> Scene:
    """Scene ``index`` of the data set ``seed``: the same arguments always give the same scene."""
    return sample_scene(scene_rng(seed, index), kind)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "triangle":  # upright isosceles: apex at the top, base at the bottom
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def cell_center(cell: int) -> tuple[float, float]:
    row, col = divmod(cell, GRID)
    return (row + 0.5) * CELL, (col + 0.5) * CELL


def render(scene: Scene, supersample: int = 4) -> np.ndarray:
    """The scene as a ``(64, 64, 3)`` uint8 RGB image, anti-aliased by supersampling each object's box."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    image[:] = scene.background
    for o in scene.objects:
        cy, cx = cell_center(o.cell)
        cy, cx = cy + o.offset[0], cx + o.offset[1]
        top, left = max(int(cy - o.radius) - 1, 0), max(int(cx - o.radius) - 1, 0)
        bottom, right = min(int(cy + o.radius) + 2, SIZE), min(int(cx + o.radius) + 2, SIZE)
        ys = top + (np.arange((bottom - top) * supersample) + 0.5) / supersample
        xs = left + (np.arange((right - left) * supersample) + 0.5) / supersample
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        mask = _shape_mask(o.shape, yy, xx, cy, cx, o.radius)
        coverage = mask.reshape(bottom - top, supersample, right - left, supersample).mean(axis=(1, 3))
        window = image[top:bottom, left:right]
        window += coverage[..., None] * (np.array(COLORS[o.color], dtype=np.float32) - window)
    return np.round(image).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- checker


def parse_caption(caption: str) -> tuple[str, tuple[SceneObject, ...]]:
    """The kind and objects a caption asks for (cells of ``count``/``mirror`` objects are left at -1)."""
    color_re, shape_re = "|".join(COLORS), "|".join(SHAPES)
    position_re = "|".join(sorted(POSITIONS, key=len, reverse=True))
    obj_re = rf"a ({color_re}) ({shape_re}) (?:at the ({position_re})|in the (center))"
    text = caption.strip().lower()
    if m := re.fullmatch(rf"{obj_re} and {obj_re}", text):
        g = m.groups()
        objects = tuple(SceneObject(g[i], g[i + 1], POSITIONS.index(g[i + 2] or g[i + 3])) for i in (0, 4))
        return "pair", objects
    if m := re.fullmatch(obj_re, text):
        return "single", (SceneObject(m[1], m[2], POSITIONS.index(m[3] or m[4])),)
    numbers = "|".join(NUMBERS.values())
    if m := re.fullmatch(rf"({numbers}) ({color_re}) ({shape_re})s", text):
        count = next(k for k, v in NUMBERS.items() if v == m[1])
        return "count", tuple(SceneObject(m[2], m[3], -1) for _ in range(count))
    if m := re.fullmatch(rf"two ({color_re}) ({shape_re})s mirrored", text):
        return "mirror", (SceneObject(m[1], m[2], -1), SceneObject(m[1], m[2], -1))
    raise ValueError(f"not a caption of the demo domain: {caption!r}")


@dataclass(frozen=True)
class Detected:
    color: str
    shape: str
    cell: int
    center: tuple[float, float]
    area: int


def detect_objects(image: np.ndarray) -> list[Detected]:
    """The objects in an RGB image: connected regions of one palette colour, with cell and shape."""
    pixels = image.astype(np.float32)
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest = distance.argmin(-1)
    is_object = distance.min(-1) < _MAX_COLOR_DISTANCE
    # A light, unsaturated pixel is background even when it is within reach of a light palette colour.
    saturation = pixels.max(-1) - pixels.min(-1)
    is_object &= saturation > 60
    found = []
    for index, name in enumerate(COLORS):
        labels, count = ndimage.label(is_object & (nearest == index))
        for label in range(1, count + 1):
            ys, xs = np.nonzero(labels == label)
            if len(ys) < _MIN_COMPONENT:
                continue
            cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
            fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shape = (
                "square" if fill >= _SQUARE_MIN_FILL else "circle" if fill >= _CIRCLE_MIN_FILL else "triangle"
            )
            cell = min(int(cy // CELL), GRID - 1) * GRID + min(int(cx // CELL), GRID - 1)
            found.append(Detected(name, shape, cell, (float(cy), float(cx)), len(ys)))
    return found


# Why a fact fails, in the order :func:`facts` tries them for a named object.
FAILURES = (
    "wrong shape",  # the named colour in the named cell, as another shape
    "wrong colour",  # the named shape in the named cell, in another colour
    "wrong cell",  # the named colour and shape, in another cell
    "not drawn",  # none of these
    "wrong number",  # count/mirror: not exactly the named number of the named colour and shape
    "not mirrored",  # mirror: the two are not in one row at the outer columns
    "extra objects",  # more objects than the caption names
    "missing objects",  # fewer objects than the caption names
)


def _missing_object_reason(wanted: SceneObject, found: list[Detected]) -> str:
    in_cell = [d for d in found if d.cell == wanted.cell]
    if any(d.color == wanted.color for d in in_cell):
        return "wrong shape"
    if any(d.shape == wanted.shape for d in in_cell):
        return "wrong colour"
    if any((d.color, d.shape) == (wanted.color, wanted.shape) for d in found):
        return "wrong cell"
    return "not drawn"


def pair_layout(pair: list[Detected]) -> str:
    """Where a pair of objects lies: ``mirrored`` (one row, the outer columns), ``two rows`` (the outer
    columns of different rows) or ``elsewhere``."""
    columns = sorted(d.cell % GRID for d in pair)
    if columns != [0, GRID - 1]:
        return "elsewhere"
    return "mirrored" if len({d.cell // GRID for d in pair}) == 1 else "two rows"


def facts(image: np.ndarray, caption: str) -> list[tuple[bool, str]]:
    """Each fact of ``caption`` checked on ``image``: whether it holds, and why it fails if it does not.

    Facts: each named object is there (colour, shape, and cell where the caption names one); the exact
    number of objects; for ``mirror``, the two objects share a row at the left and right columns.
    """
    kind, wanted = parse_caption(caption)
    found = detect_objects(image)
    result: list[tuple[bool, str]] = []
    if kind in ("single", "pair"):
        for w in wanted:
            there = any((d.color, d.shape, d.cell) == (w.color, w.shape, w.cell) for d in found)
            result.append((there, "" if there else _missing_object_reason(w, found)))
    else:
        matching = [d for d in found if (d.color, d.shape) == (wanted[0].color, wanted[0].shape)]
        result.append((len(matching) == len(wanted), "wrong number"))
        if kind == "mirror":
            mirrored = len(matching) == 2 and pair_layout(matching) == "mirrored"
            result.append((mirrored, "not mirrored"))
    total = "extra objects" if len(found) > len(wanted) else "missing objects"
    result.append((len(found) == len(wanted), total))
    return [(holds, "" if holds else reason) for holds, reason in result]


def check(image: np.ndarray, caption: str) -> float:
    """Prompt adherence of ``image`` to ``caption`` in [0, 1]: the share of the caption's :func:`facts`
    that hold."""
    checked = facts(image, caption)
    return sum(holds for holds, _ in checked) / len(checked)
