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
                                 "openvino, tensorrt (the eager baseline always runs)."),
    peers: Optional[str] = typer.Option(None, "--peers", help="Comma-separated peers timed alongside: optimum-ort, openvino "
                              "(needs the \\[peers] extra; skipped with one line without it)."),
    peers_python: Optional[Path] = typer.Option(None, "--peers-python", help="Python of a venv with the \\[peers] "
                                                "extra, for the peer workers (default: this one)."),
    rounds: int = typer.Option(5, "--rounds", help="Interleaved rounds; ratios are medians over rounds."),
    eager: bool = typer.Option(True, "--eager/--no-eager", help="Time the diffusers-style eager baseline too."),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="Comma-separated batch sizes."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps of the loop and end-to-end stages."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up calls per stage."),
    repeats: int = typer.Option(3, "--repeats", help="Timed calls per stage and round (p50/p90 over all)."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Latency-vs-batch PNG."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per backend process."),
    precision: str = typer.Option("fp32", "--precision",
                                  help="fp32, fp16 (exports; torch rows only on CUDA) or bf16 (openvino only)."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim, dpm or euler."),
    guidance_scale: float = typer.Option(DEFAULT_GUIDANCE, "--guidance-scale", help="Classifier-free guidance scale."),
    adapter_weight: Optional[float] = typer.Option(
        None, "--adapter-weight", help="Weight of the adapter (default: the weight recorded with it)."),
    engines: Path = typer.Option(Path("engines"), "--engines", help="TensorRT engine cache (with tensorrt)."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)."),
) -> None:
    """Per-stage latency (p50/p90), images/s, peak memory; ratios to `eager` and to the model without adapter."""
    from rich.console import Console

    from .. import bench as b
    from ..method.calibrate import resolve_weight
    from ..runtime.resolution import requested_latent_shape

    shape = requested_latent_shape(model=model, export=export, height=height, width=width)
    console = Console()
    given = adapter_weight is not None
    adapter_weight, how = resolve_weight(adapter_weight, guidance_scale, adapter, export)
    if adapter is None and export is None:  # timed with a fresh adapter of the default architecture
        how = "a fresh adapter of the default architecture (" + ("--adapter-weight" if given else "default") + ")"
    console.print(f"adapter weight {adapter_weight:g}: {how}", highlight=False, markup=False)
    config = b.BenchConfig(
        backends=b.parse_list(backends, "--backends"), batch_sizes=b.parse_list(batch_sizes, "--batch-sizes", int),
        model=model, adapter=str(adapter) if adapter else None, export=str(export) if export else None,
        base_export=str(base_export) if base_export else None,
        steps=steps, warmup=warmup, repeats=repeats, threads=threads, precision=precision, scheduler=scheduler,
        guidance_scale=guidance_scale, adapter_weight=adapter_weight, engines=str(engines), rounds=rounds,
        eager=eager, peers=b.parse_list(peers, "--peers") if peers else [],
        peers_python=str(peers_python.absolute()) if peers_python else None,  # not looked up on PATH
        latent_shape=list(shape) if shape else None,
    ).check()
    result = b.run_bench(config, log=lambda s: console.print(s, highlight=False, markup=False, style="dim"))
    b.write_json(result, json_out)
    console.print(b.table(result))
    if plot_out is not None:
        b.plot(result, plot_out)
    console.print(f"wrote {json_out}" + (f" and {plot_out}" if plot_out else ""), highlight=False, markup=False)
