"""`invdiff build` (TensorRT engines from an ONNX export, content-addressed cache) and `invdiff refit` (swap adapters)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("build")(build)
    app.command("refit")(refit)


def build(
    onnx: Path = typer.Option(..., "--onnx", help="Export folder (export/NAME) with manifest.json and *.onnx."),
    out: Path = typer.Option(Path("engines"), "--out", help="Engine cache folder (<key>.plan + <key>.json)."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file (default: one per "
                                                "GPU model and TensorRT version inside --out)."),
    builder_optimization_level: int = typer.Option(3, "--builder-optimization-level", min=0, max=5,
                                                   help="TensorRT builder optimisation level (0-5)."),
    workspace_gb: Optional[float] = typer.Option(None, "--workspace-gb", help="Cap the build workspace (GiB)."),
    refit_mode: str = typer.Option("individual", "--refit", help="individual: adapter weights refittable; none."),
    component: Optional[List[str]] = typer.Option(None, "--component", help="Only these components (repeatable)."),
    plan: bool = typer.Option(False, "--plan", help="Print the profiles and engine cache keys; build nothing "
                                                    "(needs no TensorRT or GPU)."),
) -> None:
    """Build (or reuse from the cache) one strongly typed TensorRT engine per exported component."""
    from rich.console import Console

    from ..export import tensorrt as trt_export

    options = trt_export.BuildOptions(timing_cache=timing_cache, builder_optimization_level=builder_optimization_level,
                                      workspace_gb=workspace_gb, refit_mode=refit_mode)
    console = Console()
    if plan:
        _print_plan(console, trt_export.build_plan(onnx, options, component))
        return
    trt_export.require_tensorrt("invdiff build")
    for name, plan, reused in trt_export.build_export(onnx, out, options, components=component):
        console.print(f"{name}: {'cached' if reused else 'built'} {plan}", highlight=False, markup=False)


def _print_plan(console, rows) -> None:
    from ..export import tensorrt as trt_export

    for row in rows:
        placeholder = row["tensorrt"] == trt_export.PLACEHOLDER_TRT or row["gpu"] == trt_export.PLACEHOLDER_GPU
        console.print(f"{row['component']}: engine key {row['key']} (TensorRT {row['tensorrt']}, GPU "
                      f"{row['gpu']['name']} {row['gpu']['compute_capability']})"
                      + ("; placeholders: on the GPU machine with TensorRT the key differs" if placeholder else ""),
                      highlight=False, markup=False)
        for name, (lo, opt, hi) in row["profile"].items():
            console.print(f"  {name}: min {lo} opt {opt} max {hi}", highlight=False, markup=False)


def refit(
    engine: Path = typer.Option(..., "--engine", help="Refittable denoiser engine (engines/<key>.plan)."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder (adapter.safetensors + adapter.json)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Export folder the engine was built from "
                                        "(default: the one recorded in the engine's sidecar)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache folder for the refitted engine (default: the "
                                       "engine's folder)."),
) -> None:
    """Put a new adapter's weights into a built engine without rebuilding it (every adapter weight is set)."""
    from rich.console import Console

    from ..export import tensorrt as trt_export

    trt_export.require_tensorrt("invdiff refit")
    plan = trt_export.refit_export_engine(engine, adapter, export_dir=onnx, out_dir=out)
    Console().print(f"refitted {engine.name} with {adapter}: {plan}", highlight=False, markup=False)
