"""Styled digits: coloured MNIST digits with a second spurious attribute, the stroke (thick or thin).

Colour follows colored-digits (majority red for even digits, green for odd; same pixels for thin strokes). The
stroke is the MNIST stroke itself ("thin") or that stroke dilated by a 3x3 grey maximum at 28 px ("thick"); its
majority is thick for digits 0-4 and thin for 5-9, so the two majorities cross over the ten digits. In train each
digit takes the minority colour with probability 1 - color_bias and, independently, the minority stroke with
probability 1 - stroke_bias. The test split holds 100 digits per class, exactly 25 per (colour, stroke) cell.
"""

from __future__ import annotations

import numpy as np

from .colored_digits import TEST_PER_DIGIT, caption, colorize, load_mnist, majority_color, minority_color, stroke_image
from .recipes import Sample

STROKES = ("thick", "thin")
ATTRIBUTES = ("color", "stroke")


def majority_stroke(digit: int) -> str:
    return "thick" if digit < 5 else "thin"


def minority_stroke(digit: int) -> str:
    return "thin" if digit < 5 else "thick"


def thicken(digit28: np.ndarray) -> np.ndarray:
    """Grey dilation with a 3x3 square (each pixel takes the max of its neighbourhood), uint8 in and out."""
    p = np.pad(digit28, 1)
    h, w = digit28.shape
    return np.max([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _sample(digit28: np.ndarray, digit: int, color_minority: bool, stroke_minority: bool, size: int) -> Sample:
    color = minority_color(digit) if color_minority else majority_color(digit)
    stroke = minority_stroke(digit) if stroke_minority else majority_stroke(digit)
    pixels = thicken(digit28) if stroke == "thick" else digit28
    row = {"text": caption(digit), "color": color, "stroke": stroke, "digit": int(digit),
           "minority_color": bool(color_minority), "minority_stroke": bool(stroke_minority),
           "minority": bool(color_minority or stroke_minority)}
    return Sample(colorize(stroke_image(pixels, size), color), row)


def _test_cells(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exactly a quarter of the test digits in each (colour minority, stroke minority) cell."""
    cell = rng.permutation(np.arange(TEST_PER_DIGIT) % 4)
    return cell >= 2, cell % 2 == 1


def _split_digit(rng: np.random.Generator, idx: np.ndarray, color_bias: float, stroke_bias: float) -> tuple:
    """(index, colour minority, stroke minority) triples for test (balanced cells) and train (independent draws)."""
    perm = rng.permutation(idx)
    test, train = perm[:TEST_PER_DIGIT], perm[TEST_PER_DIGIT:]
    test_color, test_stroke = _test_cells(rng)
    train_color = rng.random(len(train)) < 1.0 - color_bias
    train_stroke = rng.random(len(train)) < 1.0 - stroke_bias
    return list(zip(test, test_color, test_stroke)), list(zip(train, train_color, train_stroke))


def generate(color_bias: float, stroke_bias: float, seed: int, size: int) -> dict[str, list[Sample]]:
    """All samples of both splits, train in a seeded shuffled order, test grouped by digit."""
    x, y = load_mnist()
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    for digit in range(10):
        test, train = _split_digit(rng, np.flatnonzero(y == digit), color_bias, stroke_bias)
        for name, triples in (("test", test), ("train", train)):
            splits[name] += [_sample(x[i], digit, c, s, size) for i, c, s in triples]
    order = rng.permutation(len(splits["train"]))
    splits["train"] = [splits["train"][i] for i in order]
    return splits
