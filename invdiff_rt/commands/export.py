"""`invdiff export` (model + adapter -> ONNX folder) and `invdiff check` (backend parity on seeded inputs)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import typer

from ..errors import InvdiffError


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("check")(check)


def export(
    model: str = typer.Option(..., "--model", help="Base model directory (or built-in name)."),
    out: Path = typer.Option(..., "--out", help="Export folder to write, e.g. export/NAME."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Trained adapter directory to fuse in."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16 (fp16 graph; CFG/adapter math in fp32)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18-25)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Largest batch in the engine profiles."),
    no_cfg: bool = typer.Option(False, "--no-cfg", help="Export the guidance_scale == 1 denoiser (no uncond half)."),
    min_size: Optional[str] = typer.Option(None, "--min-size", help="Smallest image size, N or HxW (dynamic H/W)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Largest image size, N or HxW (dynamic H/W)."),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="Image sizes to cover, e.g. 512x512,512x768 "
                                                              "(the first is the TensorRT opt shape)."),
) -> None:
    """Export the fused denoiser, text encoder and VAE decoder to ONNX with a manifest."""
    from rich.console import Console

    from ..export.manifest import export_model
    from ..models.loader import resolve_model
    from ..runtime.resolution import export_sizes, limits_of_model_dir

    size_range = export_sizes(limits_of_model_dir(resolve_model(model)), min_size, max_size, sizes)
    console = Console(stderr=True)
    with console.status("exporting") as status:
        path = export_model(model, out, adapter, precision=precision, opset=opset, max_batch=max_batch,
                            cfg=not no_cfg, progress=lambda name: status.update(f"exporting {name}"),
                            sizes=size_range)
    console.print(f"wrote {path} ({precision}, opset {opset}, cfg={'off' if no_cfg else 'on'})", markup=False)


def check(
    model: str = typer.Option(..., "--model", help="Base model directory (the torch reference)."),
    export_dir: Path = typer.Option(..., "--export", help="Export folder from `invdiff export`."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="The adapter the export was made with."),
    batch_sizes: str = typer.Option("1,4", "--batch-sizes", help="Comma-separated batch sizes."),
    steps: int = typer.Option(4, "--steps", help="Sampling steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial latents."),
    backends: str = typer.Option("torch,onnxruntime", "--backends", help="torch first (reference), then others."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim, dpm or euler."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)."),
    engines: Path = typer.Option(Path("engines"), "--engines", help="TensorRT engine cache (with tensorrt)."),
) -> None:
    """Per-step noise prediction and final-image parity: torch vs ONNX Runtime (vs TensorRT). Exit 1 on fail."""
    from ..export.manifest import read_manifest
    from ..runtime.check import run_parity, summary
    from ..runtime.resolution import check_size, limits_of_manifest

    sizes = _batch_sizes(batch_sizes)
    names = [b.strip() for b in backends.split(",") if b.strip()]
    others = names[1:]
    if not names or names[0] != "torch" or set(others) <= {"torch"} or len(set(others)) < len(others):
        raise InvdiffError(f"--backends {backends}: start with torch (the reference) and name at least one other "
                           "backend, each once")
    limits = limits_of_manifest(read_manifest(export_dir, verify=False), export_dir)
    image_size = check_size(limits, height, width)
    reference, candidates, manifest = _runtimes(model, adapter, export_dir, names[1:], engines)
    for runtime in (reference, *candidates):
        runtime.latent_shape = limits.latent_shape(image_size)
    rows = run_parity(reference, candidates, sizes, steps=steps, seed=seed, scheduler=scheduler,
                      precision=manifest.get("precision", "fp32"), cfg=bool(manifest.get("cfg", True)))
    report = summary(rows)
    _print_table(rows)
    if json_out is not None:
        from ..artifacts import atomic_write_json

        atomic_write_json(json_out, {**report, "export": str(export_dir), "batch_sizes": sizes, "steps": steps,
                                     "seed": seed, "scheduler": scheduler, "size": list(image_size)})
    if not report["passed"]:
        raise SystemExit(1)  # not typer.Exit: cli.main runs click with standalone_mode=False, which returns it


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise InvdiffError(f"--batch-sizes {text}: give positive integers, e.g. 1,4")
    return sizes


def _runtimes(model_dir: str, adapter_dir, export_dir: Path, names: list[str], engines: Path):
    """The torch reference (matching the export's model, adapter and CFG mode) and the candidate runtimes."""
    from ..export.manifest import read_manifest
    from ..models.loader import load_model
    from ..runtime.backends import load_runtime, resolve_backend
    from ..runtime.backends.torch_backend import TorchRuntime

    manifest = read_manifest(export_dir)
    model = load_model(model_dir)
    from ..models.loader import matches_model

    if not matches_model(manifest.get("base_fingerprint"), model.path, model.fingerprint):
        raise InvdiffError(f"--export {export_dir}: exported from another base model than --model {model_dir}; "
                           "pass the model it was exported from")
    adapter = _matching_adapter(adapter_dir, manifest, model)
    cfg = bool(manifest.get("cfg", True))
    reference = TorchRuntime(model, adapter, device="cpu", cfg=cfg)
    candidates = []
    for backend in map(resolve_backend, names):
        # a torch candidate moves and casts the modules it gets in place (torch-cuda: to the GPU in fp16): its own
        # copies, so that the CPU reference stays what it is
        own = (copy.deepcopy(model), copy.deepcopy(adapter)) if backend.startswith("torch") else (model, adapter)
        candidates.append(load_runtime(backend, model=own[0], adapter=own[1], export_dir=export_dir,
                                       precision=manifest.get("precision", "fp32"), cfg=cfg, engines_dir=engines))
    return reference, candidates, manifest


def _matching_adapter(adapter_dir, manifest: dict, model):
    exported = manifest.get("adapter")
    if adapter_dir is None:
        if exported:
            raise InvdiffError(f"--adapter: the export carries adapter {exported['source']}; pass it with --adapter")
        return None
    from ..method.adapter import adapter_fingerprint, load_adapter

    if not exported:
        raise InvdiffError(f"--adapter {adapter_dir}: this export has no adapter; drop --adapter, or re-export with it")
    if exported.get("fingerprint") != adapter_fingerprint(adapter_dir):
        raise InvdiffError(f"--adapter {adapter_dir}: not the adapter this export was made with; "
                           "pass the exported adapter or re-export")
    return load_adapter(adapter_dir, model)


def _print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="backend parity (reference: torch)")
    for col in ("batch", "backend", "quantity", "max |Δ|", "rel-L2", "limit", ""):
        table.add_column(col, justify="right" if col in ("batch", "max |Δ|", "rel-L2", "limit") else "left")
    for r in rows:
        table.add_row(str(r.batch), r.backend, r.quantity, f"{r.max_abs:.2e}", f"{r.rel_l2:.2e}",
                      f"{r.threshold:.0e}", "[green]pass[/]" if r.passed else "[red]FAIL[/]")
    Console().print(table)
