"""`invdiff data make RECIPE --out DIR` and `invdiff data info DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

data_app = typer.Typer(help="Dataset folders: build the built-in biased benchmarks, show their counts.",
                       no_args_is_help=True)


@data_app.command("make")
def make(
    recipe: str = typer.Argument(..., help="Recipe: colored-digits, shapes-habitats or styled-digits."),
    out: Path = typer.Option(..., "--out", help="Dataset folder to write (replaced atomically)."),
    bias: float = typer.Option(0.95, "--bias", help="Probability that a training image has its class's majority "
                               "attribute (drawn per image; the realised share is in dataset.json)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed -> byte-identical dataset)."),
    size: int = typer.Option(32, "--size", help="Image side in pixels."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="shapes-habitats only: training images (4000)."),
    n_test: Optional[int] = typer.Option(None, "--n-test", help="shapes-habitats only: test images (1000)."),
    stroke_bias: Optional[float] = typer.Option(
        None, "--stroke-bias",
        help="styled-digits only: probability of the majority stroke (0.9); --bias is colour's."),
) -> None:
    """Build a built-in biased benchmark dataset folder."""
    from ..data.recipes import get_recipe
    from ..errors import InvdiffError

    make_fn = get_recipe(recipe)
    extra = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    if extra and recipe != "shapes-habitats":
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise InvdiffError(f"{flags}: only for shapes-habitats; drop the flag for {recipe}")
    if stroke_bias is not None:
        if recipe != "styled-digits":
            raise InvdiffError(f"--stroke-bias: only for styled-digits; drop the flag for {recipe}")
        extra["stroke_bias"] = stroke_bias
    path = make_fn(out, bias=bias, seed=seed, size=size, **extra)
    _print_info(path, attribute=None)


@data_app.command("info")
def info(
    root: Path = typer.Argument(..., help="Dataset folder (with train/ and optionally test/)."),
    attribute: Optional[str] = typer.Option(None, "--attribute", help="Column to count (default: from dataset.json)."),
) -> None:
    """Print counts per prompt x attribute value for each split."""
    _print_info(root, attribute)


def _default_attribute(root: Path, records) -> str:
    from ..artifacts import read_json
    from ..errors import InvdiffError

    manifest = root / "dataset.json"
    recorded = read_json(manifest, "dataset manifest").get("attribute") if manifest.is_file() else None
    if isinstance(recorded, str):
        return recorded
    columns = sorted({k for r in records for k in r.attrs})
    if len(columns) == 1:
        return columns[0]
    why = f"{manifest} records no attribute" if manifest.is_file() else f"{root} has no dataset.json"
    raise InvdiffError(f"--attribute: {why}; pass one of: {', '.join(columns) or 'no columns'}")


def _print_info(root: Path, attribute: Optional[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..data.folder import attribute_of, attribute_values, read_split, split_exists

    console = Console()
    for split in ("train", "test"):
        if split != "train" and not split_exists(root, split):
            continue
        records = read_split(root, split)
        column = attribute or _default_attribute(root, records)
        values = attribute_of(records, column)
        levels = attribute_values(records, column)
        table = Table(title=f"{root}/{split}: {len(records)} images, counts per prompt x {column}")
        table.add_column("prompt", no_wrap=True)
        for level in levels:
            table.add_column(str(level), justify="right")
        table.add_column("majority share", justify="right")
        for prompt in sorted({r.text for r in records}):
            counts = [sum(1 for r, v in zip(records, values) if r.text == prompt and v == lv) for lv in levels]
            table.add_row(prompt, *map(str, counts), f"{max(counts) / sum(counts):.3f}")
        console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
