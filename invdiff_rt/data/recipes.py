"""Built-in biased benchmarks and the one writer that turns generated samples into a dataset folder.

`RECIPES[name](out, bias=0.95, seed=0, size=32) -> out` builds `out/train`, `out/test` and `out/dataset.json`
under a temporary name and renames it into place, so a failed run never leaves a half-written dataset.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..artifacts import FOLDER_MARKERS, atomic_dir, atomic_write_json, atomic_write_text, package_versions
from ..errors import InvdiffError
from .folder import METADATA, data_fingerprint

SPLITS = ("train", "test")


class Sample(NamedTuple):
    """One generated image (uint8 `[H,W,3]`) and its metadata row (`text` + attribute columns, no `file_name`)."""

    image: Any
    row: dict[str, Any]


def check_params(bias: float, seed: int, size: int) -> None:
    if not 0.0 <= bias <= 1.0:
        raise InvdiffError(f"--bias {bias}: must be in [0, 1] (share of training images with the majority attribute)")
    if seed < 0:
        raise InvdiffError(f"--seed {seed}: must be >= 0")
    if not 8 <= size <= 512:
        raise InvdiffError(f"--size {size}: must be between 8 and 512 pixels")


def png_bytes(image) -> bytes:
    """Deterministic PNG bytes (PIL, no optimisation, no metadata chunks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_split(folder: Path, samples: list[Sample]) -> None:
    """PNGs `00000.png`... plus `metadata.jsonl` (file_name, text, then the attribute columns in generator order)."""
    folder.mkdir(parents=True)
    lines = []
    for i, sample in enumerate(samples):
        name = f"{i:05d}.png"
        (folder / name).write_bytes(png_bytes(sample.image))
        lines.append(json.dumps({"file_name": name, **sample.row}))
    atomic_write_text(folder / METADATA, "\n".join(lines) + "\n")


def split_stats(samples: list[Sample], attribute: str, minority_column: str = "minority") -> dict[str, Any]:
    """Counts per prompt x attribute value and the measured majority share."""
    table: dict[str, Counter] = {}
    for s in samples:
        table.setdefault(s.row["text"], Counter())[str(s.row[attribute])] += 1
    minority = sum(bool(s.row[minority_column]) for s in samples)
    return {
        "count": len(samples),
        "counts": {p: dict(sorted(c.items())) for p, c in sorted(table.items())},
        "minority": minority,
        "majority_share": round(1.0 - minority / max(len(samples), 1), 6),
    }


def write_dataset(out: str | Path, recipe: str, splits: dict[str, list[Sample]], attribute: str,
                  params: dict[str, Any], minority_column: str = "minority") -> Path:
    """Write every split and `dataset.json` atomically into `out` (replacing an existing dataset);
    `minority_column` flags `attribute`'s minority rows (its `splits` statistics and `train_bias`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvdiffError(f"--out {out}: exists and is not a folder; pick another path")
    with atomic_dir(out, FOLDER_MARKERS["dataset"]) as tmp:
        for name, samples in splits.items():
            write_split(tmp / name, samples)
        stats = {name: split_stats(samples, attribute, minority_column) for name, samples in splits.items()}
        atomic_write_json(tmp / FOLDER_MARKERS["dataset"], {
            "recipe": recipe, **params, "attribute": attribute,
            "prompts": sorted({s.row["text"] for s in splits["train"]}),
            "splits": stats,
            "train_bias": stats["train"]["majority_share"],
            "fingerprints": {name: data_fingerprint(tmp, name) for name in splits},
            "versions": package_versions(),
        })
    return out


def make_colored_digits(out: str | Path, bias: float = 0.95, seed: int = 0, size: int = 32) -> Path:
    """Coloured MNIST digits: caption `a photo of the digit 3`, attribute `color` (red/green)."""
    from . import colored_digits

    check_params(bias, seed, size)
    splits = colored_digits.generate(bias=bias, seed=seed, size=size)
    return write_dataset(out, "colored-digits", splits, "color", {"bias": bias, "seed": seed, "size": size})


def make_shapes_habitats(out: str | Path, bias: float = 0.95, seed: int = 0, size: int = 32,
                         n_train: int = 4000, n_test: int = 1000) -> Path:
    """Circles and triangles on water or land: caption `a photo of a circle`, attribute `background`."""
    from . import shapes_habitats

    check_params(bias, seed, size)
    for flag, n in (("--n-train", n_train), ("--n-test", n_test)):
        if n < 4:
            raise InvdiffError(f"{flag} {n}: must be at least 4")
    splits = shapes_habitats.generate(bias=bias, seed=seed, size=size, n_train=n_train, n_test=n_test)
    params = {"bias": bias, "seed": seed, "size": size, "n_train": n_train, "n_test": n_test}
    return write_dataset(out, "shapes-habitats", splits, "background", params)


def make_styled_digits(out: str | Path, bias: float = 0.95, seed: int = 0, size: int = 32,
                       stroke_bias: float = 0.9) -> Path:
    """Coloured MNIST digits drawn thick or thin: two spurious attributes, `color` (at `bias`) and `stroke` (at
    `stroke_bias`), drawn independently given the digit. `dataset.json` records both (`attributes`, per-attribute
    `train_bias_per_attribute` and `stats`); its `attribute` is `color`, the default column."""
    from . import styled_digits

    check_params(bias, seed, size)
    if not 0.0 <= stroke_bias <= 1.0:
        raise InvdiffError(f"--stroke-bias {stroke_bias}: must be in [0, 1] (share of training images with the "
                           "majority stroke)")
    splits = styled_digits.generate(color_bias=bias, stroke_bias=stroke_bias, seed=seed, size=size)
    stats = {a: {n: split_stats(s, a, f"minority_{a}") for n, s in splits.items()} for a in styled_digits.ATTRIBUTES}
    params = {"bias": bias, "stroke_bias": stroke_bias, "seed": seed, "size": size,
              "attributes": list(styled_digits.ATTRIBUTES),
              "train_bias_per_attribute": {a: stats[a]["train"]["majority_share"] for a in stats},
              "stats": stats}
    return write_dataset(out, "styled-digits", splits, "color", params, "minority_color")


RECIPES: dict[str, Callable[..., Path]] = {
    "colored-digits": make_colored_digits,
    "shapes-habitats": make_shapes_habitats,
    "styled-digits": make_styled_digits,
}


def get_recipe(name: str) -> Callable[..., Path]:
    if name not in RECIPES:
        raise InvdiffError(f"recipe {name!r}: unknown; choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
