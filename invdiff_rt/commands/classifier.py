"""`invdiff classifier train`: the attribute and class (fidelity) classifiers used by `invdiff eval`."""

from __future__ import annotations

from pathlib import Path

import typer

classifier_app = typer.Typer(help="Evaluation classifiers (attribute + colour-blind class classifier).",
                             no_args_is_help=True)


@classifier_app.command("train")
def train(
    data: Path = typer.Option(..., "--data", help="Dataset folder with train/ (labelled) and balanced test/."),
    attribute: str = typer.Option(..., "--attribute", help="Attribute column to classify (e.g. color, background)."),
    out: Path = typer.Option(..., "--out", help="Classifier folder to write: OUT/attribute and OUT/class."),
    epochs: int = typer.Option(8, "--epochs", help="Training epochs for each classifier."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, shuffling and augmentation."),
    strip: str = typer.Option("max-min", "--strip",
                              help="Colour stripping for the class classifier: max-min, max (grayscale) or none."),
) -> None:
    """Train both classifiers on real train images; report balanced accuracy on test/.

    The shipped classifiers are made with: invdiff data make NAME --out D &&
    invdiff classifier train --data D --attribute COLUMN --out invdiff_rt/assets/classifiers/NAME.
    A dataset with two attributes (styled-digits) runs it once per column (--out C1 --attribute color, --out C2
    --attribute stroke) and ships C1/attribute as color/, C2/attribute as stroke/ and C2/class as class/ (the
    class classifier balanced over the attribute that colour stripping leaves visible); `invdiff eval --attribute
    COLUMN` reads COLUMN/ and class/.
    """
    from rich.console import Console
    from rich.table import Table

    from ..eval.classifiers import train_classifier_pair

    manifests = train_classifier_pair(data, attribute, out, epochs=epochs, seed=seed, strip=strip)
    table = Table(title=f"{out}: balanced accuracy on {data / 'test'}")
    for col in ("classifier", "labels", "colour stripped", "balanced acc.", "worst cell acc."):
        table.add_column(col)
    for kind, m in manifests.items():
        flag = "[red]" if m["balanced_accuracy"] < 0.95 else ""
        table.add_row(kind, str(len(m["labels"])), str(m["strip_colour"]), f"{flag}{m['balanced_accuracy']:.3f}",
                      f"{m['worst_cell_accuracy']:.3f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(classifier_app, name="classifier")
