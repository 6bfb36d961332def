"""Procedural renderer and caption grammar for the built-in ``shapes`` model.

Images are 32x32 RGB uint8: one anti-aliased shape (drawn 4x supersampled with PIL, then
box-downsampled) on a flat background. Palette values stay inside [20, 240], so a real render
never has a pixel below 10 or above 250.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4
MARGIN = 1
MIN_RADIUS = 6
MAX_RADIUS = 12

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white")
BACKGROUNDS: tuple[str, ...] = (*COLORS, "black")
SIZE_WORDS: tuple[str, ...] = ("small", "large")
#: Size classes used by the judge: 0 = small (6-8 px), 1 = medium (9 px), 2 = large (10-12 px).
SIZE_CLASSES: tuple[str, ...] = ("small", "medium", "large")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 75, 220),
    "yellow": (232, 215, 40),
    "purple": (140, 45, 190),
    "orange": (238, 135, 25),
    "white": (236, 236, 236),
    "black": (24, 24, 24),
}

_CAPTION_RE = re.compile(
    r"^\s*an?\s+(?:(small|large)\s+)?([a-z]+)\s+([a-z]+)\s+on\s+an?\s+([a-z]+)\s+background\s*\.?\s*$"
)


@dataclass(frozen=True)
class ShapeSpec:
    """One render: shape, colours, optional size word, radius and centre (pixels)."""

    shape: str
    color: str
    background: str
    size: str | None
    radius: int
    cx: int
    cy: int


def size_class(radius: int) -> int:
    """Size class index of a radius (0 small, 1 medium, 2 large)."""
    if radius <= 8:
        return 0
    if radius == 9:
        return 1
    return 2


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def combination_prompt(shape: str, color: str, background: str, size: str | None = None) -> str:
    """Caption for a combination, e.g. ``"an orange cross on a black background"``."""
    first = size if size else color
    head = f"{size} {color}" if size else color
    return f"{_article(first)} {head} {shape} on {_article(background)} {background} background"


def caption(spec: ShapeSpec) -> str:
    """Caption of a spec (includes the size word when set)."""
    return combination_prompt(spec.shape, spec.color, spec.background, spec.size)


def parse_caption(text: str) -> tuple[str, str, str]:
    """Parse a caption into ``(shape, color, background)``; raises ValueError if not a valid one."""
    m = _CAPTION_RE.match(text.lower())
    if m is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    _, color, shape, background = m.groups()
    if shape not in SHAPES or color not in COLORS or background not in BACKGROUNDS or color == background:
        raise ValueError(f"not a shapes caption: {text!r}")
    return shape, color, background


def all_combinations() -> list[tuple[str, str, str]]:
    """The 196 valid (shape, color, background) triples in a fixed order."""
    return [(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS if b != c]


def _outline(shape: str, cx: float, cy: float, r: float, draw: ImageDraw.ImageDraw) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
    elif shape == "cross":
        w = 0.36 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@cache
def _mask(shape: str, radius: int) -> np.ndarray:
    """Anti-aliased coverage (float32, side 2r+2) of a shape centred on a pixel corner."""
    side = 2 * radius + 2
    s = SUPERSAMPLE
    img = Image.new("L", (side * s, side * s), 0)
    c = (radius + 1) * s
    _outline(shape, c, c, radius * s, ImageDraw.Draw(img))
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a.reshape(side, s, side, s).mean(axis=(1, 3))


def _alpha(spec: ShapeSpec) -> np.ndarray:
    r = spec.radius
    if not (MARGIN + r <= spec.cx <= SIZE - MARGIN - r and MARGIN + r <= spec.cy <= SIZE - MARGIN - r):
        raise ValueError(f"shape does not fit inside the image: {spec}")
    out = np.zeros((SIZE, SIZE), np.float32)
    x0, y0 = spec.cx - r - 1, spec.cy - r - 1
    m = _mask(spec.shape, r)
    out[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]] = m
    return out


def render(spec: ShapeSpec) -> np.ndarray:
    """Render one spec to a (32, 32, 3) uint8 array."""
    a = _alpha(spec)[..., None]
    fg = np.asarray(PALETTE[spec.color], np.float32)
    bg = np.asarray(PALETTE[spec.background], np.float32)
    return np.rint(bg * (1.0 - a) + fg * a).astype(np.uint8)


def random_specs(n: int, rng: np.random.Generator, size_word_prob: float = 0.5) -> list[ShapeSpec]:
    """Draw ``n`` random specs (uniform over the 196 combinations, radius 6-12, position inside)."""
    combos = all_combinations()
    idx = rng.integers(0, len(combos), n)
    radii = rng.integers(MIN_RADIUS, MAX_RADIUS + 1, n)
    u = rng.random((n, 3))
    specs = []
    for i in range(n):
        s, c, b = combos[idx[i]]
        r = int(radii[i])
        lo, hi = MARGIN + r, SIZE - MARGIN - r
        cx = lo + int(u[i, 0] * (hi - lo + 1))
        cy = lo + int(u[i, 1] * (hi - lo + 1))
        cls = size_class(r)
        word = None if cls == 1 or u[i, 2] >= size_word_prob else SIZE_CLASSES[cls]
        specs.append(ShapeSpec(s, c, b, word, r, cx, cy))
    return specs


def labels_of(specs: list[ShapeSpec]) -> dict[str, np.ndarray]:
    """Integer label arrays (shape, color, background, size class) for specs."""
    return {
        "shape": np.array([SHAPES.index(s.shape) for s in specs], np.int64),
        "color": np.array([COLORS.index(s.color) for s in specs], np.int64),
        "background": np.array([BACKGROUNDS.index(s.background) for s in specs], np.int64),
        "size": np.array([size_class(s.radius) for s in specs], np.int64),
    }


def render_specs(specs: list[ShapeSpec], chunk: int = 8192) -> np.ndarray:
    """Render many specs to an (N, 32, 32, 3) uint8 array (vectorised compositing)."""
    n = len(specs)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    pal_names = list(PALETTE)
    pal = np.asarray([PALETTE[k] for k in pal_names], np.float32)
    for start in range(0, n, chunk):
        part = specs[start : start + chunk]
        alpha = np.stack([_alpha(s) for s in part])[..., None]
        fg = pal[[pal_names.index(s.color) for s in part]][:, None, None, :]
        bg = pal[[pal_names.index(s.background) for s in part]][:, None, None, :]
        out[start : start + len(part)] = np.rint(bg + (fg - bg) * alpha).astype(np.uint8)
    return out


def render_dataset(
    n: int, seed: int, size_word_prob: float = 0.5
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Render ``n`` random images: (uint8 N x 32 x 32 x 3, captions, label arrays)."""
    rng = np.random.default_rng(seed)
    specs = random_specs(n, rng, size_word_prob)
    return render_specs(specs), [caption(s) for s in specs], labels_of(specs)
