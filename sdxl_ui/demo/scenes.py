"""The scene world the demo model is trained on, and a reader that judges its pictures by plain image analysis.

One flat-coloured shape (circle, square or triangle) on a flat background; 128×128 by default. Everything is
deterministic from a seed (``numpy.random.Generator``), and training, tests and ``eval-demo`` share this module,
so anyone can check a picture against its prompt without a model. numpy only: no torch, no ML.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 128

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 50), "green": (40, 170, 70),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.5}  # box side d as a fraction of the width
POSITIONS = {"center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
             "bottom": (0.5, 0.75)}
# Never in a training caption or image: whether the model composes words it never saw together.
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "square"), ("white", "circle")})
WORDS = sorted({*COLORS, *SHAPES, *SIZES, *POSITIONS, "a", "an", "on", "the", "at", "in", "of", "background",
                "with", "shape", "image", "picture", "middle"})

ATTRIBUTES = ("color", "background", "shape", "position", "size")


@dataclass(frozen=True)
class Scene:
    color: str
    background: str
    shape: str
    position: str
    size: str

    def __post_init__(self):
        for field, value, allowed in (("color", self.color, COLORS), ("background", self.background, COLORS),
                                      ("shape", self.shape, SHAPES), ("position", self.position, POSITIONS),
                                      ("size", self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"{field}: {value!r} is not one of {sorted(allowed)}")
        if self.color == self.background:
            raise ValueError(f"background: {self.background!r} is the shape's colour too")

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT


def _choice(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, held_out: bool | None = False, **fixed) -> Scene:
    """A random scene. held_out=False never yields a held-out colour/shape pair, True only those, None either."""
    while True:
        color = fixed.get("color") or _choice(rng, COLORS)
        shape = fixed.get("shape") or _choice(rng, SHAPES)
        background = fixed.get("background") or _choice(rng, [c for c in COLORS if c != color])
        scene = Scene(color=color, background=background, shape=shape,
                      position=fixed.get("position") or _choice(rng, POSITIONS),
                      size=fixed.get("size") or _choice(rng, SIZES))
        if held_out is None or scene.held_out == held_out:
            return scene
        if "color" in fixed and "shape" in fixed:
            raise ValueError(f"color/shape: {color} {shape} cannot be drawn with held_out={held_out}")


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = SIZE,
           jitter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(H×W×3 uint8 image, H×W bool mask of the shape). Jitter: size ±8 %, position ±0.03·W, colour ±8."""
    rng = rng if rng is not None else np.random.default_rng(0)
    j = (lambda lo, hi: float(rng.uniform(lo, hi))) if jitter else (lambda lo, hi: 0.0)
    d = SIZES[scene.size] * size * (1.0 + j(-0.08, 0.08))
    fx, fy = POSITIONS[scene.position]
    cx, cy = (fx + j(-0.03, 0.03)) * size, (fy + j(-0.03, 0.03)) * size

    def tint(name):
        base = np.array(COLORS[name], dtype=np.float64)
        noise = np.array([j(-8, 8) for _ in range(3)])
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    if scene.shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (d / 2) ** 2
    elif scene.shape == "square":
        mask = (np.abs(xx - cx) <= d / 2) & (np.abs(yy - cy) <= d / 2)
    else:  # apex at the top centre of the box, base along its bottom edge
        top, bottom = cy - d / 2, cy + d / 2
        half = (yy - top) / d * (d / 2)  # half-width grows linearly from 0 at the apex to d/2 at the base
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = tint(scene.background)
    image[mask] = tint(scene.color)
    return image, mask


# ---------------------------------------------------------------- captions

_TEMPLATES = (
    "a {size} {color} {shape} {where} {on_bg}",
    "{bg_first} a {size} {color} {shape} {where}",
    "a {color} {shape} {where} {on_bg}",
    "{bg_first} a {color} {shape} {where}",
    "a {size} {color} {shape} {where}, {bg_last}",
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "{color} {shape} {where}",
)


def caption(scene: Scene, rng: np.random.Generator, keep: float = 0.75) -> str:
    """A natural caption; each attribute is kept with probability ``keep`` (left out = it was random)."""
    def keep_it():
        return rng.random() < keep

    template = _choice(rng, _TEMPLATES)
    color = scene.color if keep_it() else ""
    shape = scene.shape if rng.random() < max(keep, 0.85) else "shape"
    size = scene.size if keep_it() else ""
    where = ""
    if keep_it():
        where = {"center": _choice(rng, ["in the center", "in the middle", "at the center"]),
                 "left": _choice(rng, ["on the left", "at the left"]),
                 "right": _choice(rng, ["on the right", "at the right"]),
                 "top": _choice(rng, ["at the top", "on the top"]),
                 "bottom": _choice(rng, ["at the bottom", "on the bottom"])}[scene.position]
    bg = scene.background if keep_it() else ""
    text = template.format(size=size, color=color, shape=shape, where=where,
                           on_bg=f"on a {bg} background" if bg else "",
                           bg_first=f"{bg} background," if bg else "",
                           bg_last=f"{bg} background" if bg else "")
    return " ".join(text.replace(" ,", ",").split()).strip(" ,")


def prompt_for(scene: Scene, attributes=ATTRIBUTES) -> str:
    """The canonical prompt naming the given attributes (what eval-demo and the tests ask for)."""
    words = ["a"]
    if "size" in attributes:
        words.append(scene.size)
    if "color" in attributes:
        words.append(scene.color)
    words.append(scene.shape if "shape" in attributes else "shape")
    if "position" in attributes:
        words.append({"center": "in the center", "left": "on the left", "right": "on the right",
                      "top": "at the top", "bottom": "at the bottom"}[scene.position])
    if "background" in attributes:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


# ---------------------------------------------------------------- reader

@dataclass(frozen=True)
class Reading:
    background: str | None
    color: str | None
    shape: str | None
    position: str | None
    size: str | None
    fill: float = 0.0  # shape pixels / bounding-box pixels
    area: float = 0.0  # shape pixels / image pixels

    def matches(self, scene: Scene, attributes=ATTRIBUTES) -> dict[str, bool]:
        return {a: getattr(self, a) == getattr(scene, a) for a in attributes}


_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float64)


def nearest_color(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float64)
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def _nearest_indices(pixels: np.ndarray) -> np.ndarray:
    return np.argmin(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)


def _template(shape: str, cx: float, cy: float, d: float, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= (d / 2) ** 2
    if shape == "square":
        return (np.abs(xx - cx) <= d / 2) & (np.abs(yy - cy) <= d / 2)
    top = cy - d / 2
    return (yy >= top) & (yy <= cy + d / 2) & (np.abs(xx - cx) <= (yy - top) / 2)


def read_scene(image) -> Reading:
    """Read background, shape colour, kind, position and size from an RGB image (any square size).

    1. Background: the palette colour most border pixels are nearest to.
    2. Shape: pixels far (> 60 in RGB distance) from the background's measured colour; its colour is the
       palette colour nearest to their median.
    3. Box: the 1st-99th percentile of the shape pixels' coordinates (robust to stray pixels), its side the
       larger extent; a box cut by the image edge is re-centred from its uncut side.
    4. Kind: the circle, square and triangle templates drawn in that box; the best overlap (IoU) wins.
       Position and size are the nearest of the five box centres and the two sizes.
    """
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    nearest = _nearest_indices(border)
    counts = np.bincount(nearest, minlength=len(_PALETTE_NAMES))
    bg_index = int(np.argmax(counts))
    background = _PALETTE_NAMES[bg_index]
    bg_rgb = np.median(border[nearest == bg_index], axis=0)
    mask = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > 60
    area = float(mask.mean())
    if mask.sum() < 0.004 * h * w:  # fewer than ~65 pixels at 128²: no shape
        return Reading(background, None, None, None, None, 0.0, area)
    color = nearest_color(np.median(img[mask], axis=0))
    ys, xs = np.nonzero(mask)
    x0, x1 = np.percentile(xs, [1, 99]) + (0.0, 1.0)
    y0, y1 = np.percentile(ys, [1, 99]) + (0.0, 1.0)
    d = max(x1 - x0, y1 - y0)
    cx = x1 - d / 2 if x0 <= 1 < w - 1 - x1 else x0 + d / 2 if x1 >= w - 1 else (x0 + x1) / 2
    cy = y1 - d / 2 if y0 <= 1 < h - 1 - y1 else y0 + d / 2 if y1 >= h - 1 else (y0 + y1) / 2
    scores = {}
    for kind in SHAPES:
        t = _template(kind, cx, cy, d, h, w)
        scores[kind] = (t & mask).sum() / max(1, (t | mask).sum())
    shape = max(scores, key=scores.get)
    size = min(SIZES, key=lambda s: abs(SIZES[s] - d / w))
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx / w) ** 2 + (POSITIONS[p][1] - cy / h) ** 2)
    box = mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
    return Reading(background, color, shape, position, size, float(box.mean()) if box.size else 0.0, area)


def eval_scenes(n: int = 48, seed: int = 1234, held_out: bool = False) -> list[Scene]:
    """A fixed, balanced set of fully specified scenes (the adherence prompt set)."""
    rng = np.random.default_rng(seed)
    scenes = []
    pairs = sorted(HELD_OUT) if held_out else [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
    order = rng.permutation(len(pairs))
    for i in range(n):
        color, shape = pairs[order[i % len(pairs)]]
        scenes.append(sample_scene(rng, held_out=None, color=color, shape=shape))
    return scenes


def with_(scene: Scene, **changes) -> Scene:
    return replace(scene, **changes)
