"""Shapes in habitats: a procedural Waterbirds analogue (numpy only).

A circle or a triangle, filled with a colour independent of the class and jittered in size and position, sits on
water (blue, horizontal wavy stripes of three shades) or land (green/brown noise blobs). In train the background
follows the class (circle -> water, triangle -> land) with probability `bias`; test is balanced 50/50 per class.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .recipes import Sample

SHAPES = ("circle", "triangle")
HABITAT = {"circle": "water", "triangle": "land"}
OTHER = {"water": "land", "land": "water"}
PALETTE = {
    "red": (230, 30, 30), "yellow": (250, 230, 40), "white": (250, 250, 250),
    "magenta": (230, 40, 220), "orange": (255, 150, 20),
}
WATER = np.array([(20, 60, 170), (40, 100, 220), (90, 150, 245)], dtype=np.float32)
LAND = np.array([(40, 120, 30), (110, 80, 35), (70, 150, 50)], dtype=np.float32)
SUPERSAMPLE = 4


def caption(shape: str) -> str:
    return f"a photo of a {shape}"


@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [0, 1] of an n x n grid (read-only, cached)."""
    y, x = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n
    y.flags.writeable = x.flags.writeable = False
    return y, x


def water(rng: np.random.Generator, size: int) -> np.ndarray:
    """Horizontal wavy stripes cycling through three blues."""
    y, x = _grid(size)
    width = rng.uniform(0.1, 0.14)
    wave = 0.05 * np.sin(2 * np.pi * (x * rng.uniform(1.0, 2.0) + rng.uniform()))
    band = np.floor((y + wave + rng.uniform()) / width).astype(np.int64) % 3
    return WATER[band]


def land(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blobs of green and brown: coarse noise, bilinearly upsampled, cut into three levels."""
    from PIL import Image

    coarse = rng.random((5, 5)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    level = np.digitize(smooth, np.quantile(smooth, [1 / 3, 2 / 3]))
    return LAND[level]


def shape_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a jittered circle or upright triangle."""
    y, x = _grid(size * SUPERSAMPLE)
    cx, cy = 0.5 + rng.uniform(-0.12, 0.12, size=2)
    r = rng.uniform(0.22, 0.3)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= (r * 0.85) ** 2
    else:  # apex up: below the top two edges and above the base line
        top, base, half = cy - 1.1 * r, cy + 0.8 * r, 1.1 * r
        slope = half / (base - top)
        inside = (y <= base) & (np.abs(x - cx) <= (y - top) * slope)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(rng: np.random.Generator, shape: str, background: str, fill: str, size: int) -> np.ndarray:
    """One uint8 `[size,size,3]` image."""
    bg = water(rng, size) if background == "water" else land(rng, size)
    mask = shape_mask(rng, shape, size)[..., None]
    img = bg * (1 - mask) + np.asarray(PALETTE[fill], dtype=np.float32) * mask
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _labels(rng: np.random.Generator, n: int, bias: float, balanced: bool) -> list[tuple[str, bool]]:
    """(shape, minority) pairs: classes balanced; minority exactly half per class or Bernoulli(1 - bias)."""
    shapes = np.array([SHAPES[i % 2] for i in range(n)])
    minority = np.zeros(n, dtype=bool)
    for s in SHAPES:
        idx = np.flatnonzero(shapes == s)
        if balanced:
            minority[idx] = rng.permutation(np.arange(len(idx)) < len(idx) // 2)
        else:
            minority[idx] = rng.random(len(idx)) < 1.0 - bias
    order = rng.permutation(n)
    return [(str(shapes[i]), bool(minority[i])) for i in order]


def _split(rng: np.random.Generator, n: int, bias: float, size: int, balanced: bool) -> list[Sample]:
    samples = []
    fills = list(PALETTE)
    for shape, minority in _labels(rng, n, bias, balanced):
        background = OTHER[HABITAT[shape]] if minority else HABITAT[shape]
        fill = fills[rng.integers(len(fills))]
        row = {"text": caption(shape), "background": background, "shape": shape, "fill": fill, "minority": minority}
        samples.append(Sample(render(rng, shape, background, fill, size), row))
    return samples


def generate(bias: float, seed: int, size: int, n_train: int = 4000, n_test: int = 1000) -> dict[str, list[Sample]]:
    """Both splits; train and test use independent child streams of the seed."""
    train_rng, test_rng = np.random.default_rng(seed).spawn(2)
    return {
        "train": _split(train_rng, n_train, bias, size, balanced=False),
        "test": _split(test_rng, n_test, bias, size, balanced=True),
    }
