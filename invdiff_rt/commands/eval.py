"""`invdiff eval`: bias, fidelity and quality of a (debiased) model on a dataset's training prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


def eval_command(
    model: str = typer.Option(..., "--model", help="Base model folder (or built-in model name)."),
    data: Path = typer.Option(..., "--data", help="Dataset folder: prompts from train/, FID reference from test/."),
    attribute: str = typer.Option(..., "--attribute", help="Attribute column whose balance is measured."),
    json_out: Path = typer.Option(..., "--json", help="Report to write (JSON)."),
    per_prompt: int = typer.Option(..., "--per-prompt", help="Images generated per prompt (N)."),
    seed: int = typer.Option(..., "--seed", help="Sampling seed (image i of a prompt depends only on it)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Debiasing adapter folder."),
    adapter_weight: Optional[float] = typer.Option(
        None, "--adapter-weight", "--guidance-weight",
        help="Weight W of the adapter's guidance (default: the weight calibrated for this CFG scale in "
             "adapter.json, else its recommended weight; 0 = the base)."),
    classifier: Optional[Path] = typer.Option(None, "--classifier",
                                              help="Classifier folder (default: shipped one for built-in data)."),
    steps: int = typer.Option(25, "--steps", help="Denoising steps."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="CFG scale (default: sampler's)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per denoising batch (does not change images)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Sample grid PNG (default: next to --json)."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)."),
) -> None:
    """Generate N images per training prompt, classify them, write the JSON report and a sample grid."""
    from ..artifacts import atomic_write_json
    from ..eval.evaluate import run_evaluation
    from ..eval.plots import save_grid
    from ..runtime.resolution import requested_latent_shape

    if json_out.exists() and json_out.is_dir():
        from ..errors import InvdiffError

        raise InvdiffError(f"--json {json_out}: is a folder; pass a file path such as {json_out / 'eval.json'}")
    shape = requested_latent_shape(model=model, height=height, width=width)
    how = None
    if adapter is not None:
        from ..method.calibrate import resolve_weight
        from ..runtime.defaults import DEFAULT_GUIDANCE

        scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        adapter_weight, how = resolve_weight(adapter_weight, scale, adapter)
        typer.echo(f"adapter weight {adapter_weight:g}: {how}")
    run = run_evaluation(model, data, attribute, classifier, per_prompt, seed, steps=steps,
                         guidance_scale=guidance_scale, batch_size=batch_size, adapter=adapter,
                         adapter_weight=1.0 if adapter_weight is None else adapter_weight, latent_shape=shape)
    grid_path = grid or json_out.with_suffix(".png")
    save_grid(grid_path, run.images, len(run.prompts))
    atomic_write_json(json_out, {**run.report, "grid": str(grid_path), "adapter_weight_chosen_by": how})
    _print_summary(run.report, json_out, grid_path)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


HEADLINE = (("bias_filtered", "bias, fidelity-filtered (primary)"), ("bias", "bias"), ("bias_std", "bias std"),
            ("fd", "fairness discrepancy"), ("fidelity", "fidelity"), ("majority_share", "train-majority share"),
            ("fid", "FID (classifier features)"), ("precision", "precision (k=3)"), ("recall", "recall (k=3)"))


def _print_summary(report: dict, json_out: Path, grid: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"invdiff eval: {len(report['prompts'])} prompts x N={report['n_per_prompt']}, "
                        f"noise floor {report['noise_floor']:.3f}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in HEADLINE:
        table.add_row(label, _fmt(report[key]))
    console = Console()
    console.print(table)
    console.print(f"report: {json_out}\ngrid:   {grid}", highlight=False, markup=False)
