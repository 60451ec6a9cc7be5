"""`invdiff bench`: latency/throughput/memory of each backend next to the diffusers-style eager baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..runtime.defaults import DEFAULT_GUIDANCE


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    json_out: Path = typer.Option(..., "--json", help="Results JSON (one record per backend and batch size)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model folder (or built-in model name)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter folder (default: a fresh adapter of "
                                           "the default architecture, same cost as a trained one)."),
    export: Optional[Path] = typer.Option(None, "--export", help="Export folder (export/NAME) for the engine "
                                          "backends (with --model for the eager baseline if not recorded)."),
    base_export: Optional[Path] = typer.Option(None, "--base-export", help="The same base model exported without "
                                               "adapter (default: exported on the fly for the overhead pair)."),
    backends: str = typer.Option("torch,onnxruntime", "--backends", help="Comma-separated: torch, onnxruntime, "
                                 "tensorrt (the eager baseline always runs)."),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="Comma-separated batch sizes."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps of the loop and end-to-end stages."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up calls per stage."),
    repeats: int = typer.Option(10, "--repeats", help="Timed calls per stage (p50/p90 over them)."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Latency-vs-batch PNG."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per backend process."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim, dpm or euler."),
    guidance_scale: float = typer.Option(DEFAULT_GUIDANCE, "--guidance-scale", help="Classifier-free guidance scale."),
    adapter_weight: Optional[float] = typer.Option(
        None, "--adapter-weight", help="Weight of the adapter (default: the weight recorded with it)."),
    engines: Path = typer.Option(Path("engines"), "--engines", help="TensorRT engine cache (with tensorrt)."),
) -> None:
    """Per-stage latency (p50/p90), images/s, peak memory; ratios to `eager` and to the model without adapter."""
    from rich.console import Console

    from .. import bench as b
    from ..method.calibrate import resolve_weight

    console = Console()
    adapter_weight, how = resolve_weight(adapter_weight, guidance_scale, adapter, export)
    console.print(f"adapter weight {adapter_weight:g}: {how}", highlight=False)
    config = b.BenchConfig(
        backends=b.parse_list(backends, "--backends"), batch_sizes=b.parse_list(batch_sizes, "--batch-sizes", int),
        model=model, adapter=str(adapter) if adapter else None, export=str(export) if export else None,
        base_export=str(base_export) if base_export else None,
        steps=steps, warmup=warmup, repeats=repeats, threads=threads, precision=precision, scheduler=scheduler,
        guidance_scale=guidance_scale, adapter_weight=adapter_weight, engines=str(engines),
    ).check()
    result = b.run_bench(config, log=lambda s: console.print(s, highlight=False, style="dim"))
    b.write_json(result, json_out)
    console.print(b.table(result))
    if plot_out is not None:
        b.plot(result, plot_out)
    console.print(f"wrote {json_out}" + (f" and {plot_out}" if plot_out else ""), highlight=False)
