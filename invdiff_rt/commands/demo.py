"""`invdiff demo`: the whole pipeline on the embedded default benchmark."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (stages are reused on rerun)."),
    per_prompt: int = typer.Option(32, "--per-prompt", help="Evaluation images per prompt."),
    train_steps: int = typer.Option(2000, "--train-steps", help="Adapter training steps."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch / ONNX Runtime (0 = default)."),
) -> None:
    """Run data -> groups -> adapter -> export -> generate -> eval -> bench on colored-digits; write report.md."""
    from ..demo import DemoConfig, run_demo

    cfg = DemoConfig(per_prompt=per_prompt, train_steps=train_steps, seed=seed, threads=threads or None)
    report = run_demo(out, cfg)
    typer.echo(f"report: {report}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
