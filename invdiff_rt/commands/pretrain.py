"""`invdiff pretrain`: train the embedded mini-SD base model on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def pretrain(
    data: Path = typer.Option(..., "--data", help="Dataset folder (imagefolder convention, uses train/)."),
    out: Path = typer.Option(..., "--out", help="Output diffusers model directory."),
    steps: int = typer.Option(3500, "--steps", help="UNet + text encoder steps."),
    vae_steps: int = typer.Option(1000, "--vae-steps", help="VAE steps."),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    fp16_weights: bool = typer.Option(False, "--fp16-weights", help="Store weights in fp16 (half the size)."),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = torch default)."),
    init_from: Optional[str] = typer.Option(
        None, "--init-from",
        help="Start from this model (folder or built-in name): keep its tokenizer and VAE, fine-tune the rest."),
    ema_decay: float = typer.Option(0.999, "--ema-decay", help="EMA decay of the saved weights (lower for short runs)."),
    warmup: int = typer.Option(100, "--warmup", help="Learning-rate warmup steps."),
) -> None:
    """Train the mini Stable-Diffusion base model (VAE, then text encoder + UNet); resumable."""
    from ..models.pretrain import PretrainConfig
    from ..models.pretrain import pretrain as run

    cfg = PretrainConfig(steps=steps, vae_steps=vae_steps, batch=batch_size, lr=lr, seed=seed,
                         checkpoint_every=checkpoint_every, threads=threads or None, ema_decay=ema_decay,
                         warmup=warmup)
    path = run(data, out, cfg, fp16_weights=fp16_weights, init_from=init_from)
    typer.echo(f"model written to {path}")


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
