"""`invdiff demo`: the whole pipeline on the embedded default benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..method.defaults import ADAPTER_STEPS


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (stages are reused on rerun)."),
    per_prompt: Optional[int] = typer.Option(None, "--per-prompt", help="Evaluation images per prompt (default 32)."),
    train_steps: Optional[int] = typer.Option(None, "--train-steps",
                                              help=f"Adapter training steps (default {ADAPTER_STEPS})."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch / ONNX Runtime (0 = default)."),
) -> None:
    """Run data -> groups -> adapter -> export -> generate -> eval -> bench on colored-digits; write report.md."""
    from ..demo import DemoConfig, run_demo

    given = {"per_prompt": per_prompt, "train_steps": train_steps}
    cfg = DemoConfig(seed=seed, threads=threads or None, **{k: v for k, v in given.items() if v is not None})
    report = run_demo(out, cfg)
    typer.echo(f"report: {report}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
