"""`invdiff model build-sd`: an offline SD-1.5 / SD-2.1-class checkpoint with random, seeded weights."""

from __future__ import annotations

from pathlib import Path

import typer

model_app = typer.Typer(help="Model checkpoints (offline SD-class builders).", no_args_is_help=True)


@model_app.command("build-sd")
def build_sd(
    variant: str = typer.Option("sd15", "--variant", help="sd15 (epsilon, CLIP-L dims) or sd21 (v_prediction, "
                                                          "OpenCLIP-H dims, linear projections)."),
    out: Path = typer.Option(..., "--out", help="Diffusers model directory to write."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Write a diffusers SD directory with SD's exact UNet/VAE/text configs and random seeded weights."""
    from rich.console import Console

    from ..models.sd import build_sd as build

    path = build(variant, out, seed)
    Console(stderr=True).print(f"wrote {path} ({variant}, seed {seed})", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
