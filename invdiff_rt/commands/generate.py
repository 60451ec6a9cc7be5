"""`invdiff generate`: deterministic, resumable batch generation (sharded under torchrun / accelerate launch)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..runtime.defaults import DEFAULT_GUIDANCE


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
    out: Path = typer.Option(..., "--out", help="Output folder (PNGs, manifest.jsonl, grids, run.json)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model folder (or built-in model name)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter folder (with --model; with --export "
                                           "--backend tensorrt: the adapter `invdiff refit` put into the engine)."),
    export: Optional[Path] = typer.Option(None, "--export", help="Export folder (export/NAME) instead of --model."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="Prompt text (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="File: one prompt per line, # comments."),
    num: int = typer.Option(4, "--num", help="Images per prompt."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per denoising batch (the images do not change on "
                                   "ONNX Runtime or OpenVINO on the CPU; a recorded setting on torch, whose kernels "
                                   "round differently at other batch sizes, and on the GPU backends)."),
    seed: int = typer.Option(0, "--seed", help="Seed: image (prompt, index) depends only on it."),
    steps: int = typer.Option(25, "--steps", help="Denoising steps."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Classifier-free guidance scale "
                                                   f"(default: {DEFAULT_GUIDANCE:g}; 1 for a --no-cfg export)."),
    adapter_weight: Optional[float] = typer.Option(
        None, "--adapter-weight", help="Weight of the debiasing adapter (default: the weight recorded with it)."),
    backend: str = typer.Option("auto", "--backend",
                                help="auto, torch, torch-cuda, openvino, onnxruntime, onnxruntime-cuda or tensorrt."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim, dpm or euler."),
    precision: str = typer.Option("fp32", "--precision", help="fp32; fp16 (torch-cuda); bf16 (openvino, lossy)."),
    threads: Optional[int] = typer.Option(None, "--threads",
                                          help="CPU threads for the backend (on torch a run setting: resume "
                                               "with the same)."),
    engines: Path = typer.Option(Path("engines"), "--engines", help="TensorRT engine cache (`invdiff build --out`)."),
    no_grid: bool = typer.Option(False, "--no-grid",
                                 help="Do not write a grid PNG per prompt (of its first 64 images)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse --out even if its settings differ."),
    merge: bool = typer.Option(False, "--merge", help="Only merge the rank manifests in --out (and grids)."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's, or an export's "
                                         "opt size when its range leaves that out)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's, or an export's opt "
                                        "size when its range leaves that out)."),
) -> None:
    """Generate N images per prompt; rerun the same command to resume; runs one shard per rank under torchrun."""
    from rich.console import Console

    from ..runtime import generate as gen

    if merge:
        _merge(out, not no_grid)
        return
    from ..method.calibrate import resolve_weight

    prompts = _prompts(prompt, prompts_file)
    guidance_scale = gen.guidance_for(guidance_scale, export)
    adapter_weight, how = resolve_weight(adapter_weight, guidance_scale, adapter, export)
    console = Console()
    if adapter is not None or export is not None:
        console.print(f"adapter weight {adapter_weight:g}: {how}", highlight=False, markup=False, soft_wrap=True)
    result = gen.generate(prompts, out, model=model, adapter=adapter, export=export, backend=backend,
                          precision=precision, threads=threads, num=num, seed=seed, steps=steps,
                          guidance_scale=guidance_scale, adapter_weight=adapter_weight, scheduler=scheduler,
                          batch_size=batch_size, overwrite=overwrite, grid=not no_grid, height=height, width=width,
                          engines=engines)
    console.print(result.summary(), highlight=False, markup=False, soft_wrap=True)
    if result.manifest is None:
        console.print(f"rank {result.rank}: other ranks still running; the last to finish writes "
                      f"{out / gen.MANIFEST}", highlight=False, markup=False, soft_wrap=True)


def _prompts(prompt: Optional[List[str]], prompts_file: Optional[Path]) -> list[str]:
    from ..errors import InvdiffError
    from ..runtime.generate import read_prompts

    if bool(prompt) == (prompts_file is not None):
        raise InvdiffError("--prompt/--prompts: pass one of them (--prompt TEXT, repeatable, or --prompts FILE)")
    return [p.strip() for p in prompt] if prompt else read_prompts(prompts_file)  # as a file's lines are


def _merge(out: Path, grid: bool) -> None:
    from rich.console import Console

    from ..runtime import generate as gen

    settings = gen.read_settings(out)
    records = gen.finished_records(out, settings)
    gen.remove_stale_tmp(out, [gen.MANIFEST, *(f"{gen.prompt_slug(p)}/{gen.GRID}" for p, _ in records)])
    path = gen.merge_manifests(out, settings, records)
    gen.remove_replaced(out, records)  # what an --overwrite run replaced, when its last rank died before merging
    grids = gen.write_grids(out, records) if grid else []
    Console().print(f"merged {len(records)} images into {path}; {len(grids)} grids", highlight=False, markup=False,
                    soft_wrap=True)
