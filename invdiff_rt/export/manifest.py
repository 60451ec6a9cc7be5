"""The export folder: `denoiser.onnx`, `text_encoder.onnx`, `vae_decoder.onnx`, `tokenizer/`, `scheduler/` and a
`manifest.json` (opset, precision, I/O names and shapes, sha256 of every file, base/adapter fingerprints, specs,
adapter refit map, package versions). Built under a temporary name and renamed into place.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .. import artifacts
from ..errors import InvdiffError
from . import onnx_export
from .spec import PRECISIONS, ExportSpec, component_specs

MANIFEST_NAME = artifacts.FOLDER_MARKERS["export"]
FORMAT = "invdiff-rt/export"
FORMAT_VERSION = 1
COMPONENTS = ("denoiser", "text_encoder", "vae_decoder")  # the graphs of an export
COPIED_DIRS = ("tokenizer", "scheduler")


def export_model(model_dir: str | Path, out: str | Path, adapter_dir: str | Path | None = None,
                 precision: str = "fp32", opset: int = onnx_export.MIN_OPSET, max_batch: int = 32,
                 cfg: bool = True, components: tuple[str, ...] | None = None,
                 progress=None, sizes=None) -> Path:
    """Export every component of a model (+ adapter) into the folder `out` and return it. `sizes`: (min, opt,
    max) image sizes (H, W) for a dynamic-resolution export (`resolution.export_sizes`); None: the model's size."""
    from ..models.loader import load_model

    _check_options(precision, opset, max_batch)
    model = load_model(model_dir)
    adapter, adapter_info = _load_adapter(adapter_dir, model)
    specs = component_specs(model, cfg, max_batch, precision, sizes)
    names = components or tuple(specs)
    with artifacts.atomic_dir(out, MANIFEST_NAME) as tmp:
        entries, refit = {}, {}
        for name in names:
            if progress is not None:
                progress(name)
            entries[name], weights = _export_component(name, model, adapter, specs[name], tmp, opset, cfg)
            refit.update(onnx_export.refit_map(weights))
        for sub in COPIED_DIRS:
            shutil.copytree(model.path / sub, tmp / sub)
        manifest = build_manifest(tmp, model, entries, adapter_info, refit,
                                  dict(opset=opset, precision=precision, cfg=cfg, max_batch=max_batch))
        artifacts.atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return Path(out)


def _check_options(precision: str, opset: int, max_batch: int) -> None:
    if precision not in PRECISIONS:
        raise InvdiffError(f"--precision {precision}: unknown; choose one of {', '.join(PRECISIONS)}")
    if opset < onnx_export.MIN_OPSET:
        raise InvdiffError(f"--opset {opset}: the exporter needs opset >= {onnx_export.MIN_OPSET}; pass --opset 18")
    if max_batch < 1:
        raise InvdiffError(f"--max-batch {max_batch}: must be >= 1")


def _load_adapter(adapter_dir, model):
    if adapter_dir is None:
        return None, None
    from ..method.adapter import adapter_fingerprint, load_adapter, read_adapter_manifest

    adapter = load_adapter(adapter_dir, model)  # refuses an adapter trained on another base (one-line error)
    manifest = read_adapter_manifest(adapter_dir)
    info = {"fingerprint": adapter_fingerprint(adapter_dir), "config": manifest["config"],
            "base_fingerprint": manifest["base_fingerprint"], "weights_sha256": manifest["weights_sha256"],
            "source": str(Path(adapter_dir).resolve()), "recipe": manifest.get("recipe"),
            "recommended_weight": manifest.get("recommended_weight"), "calibration": manifest.get("calibration"),
            "from_t": manifest.get("from_t")}
    return adapter, info


def adapter_from_t(manifest: dict) -> int | None:
    """The exported adapter's first active timestep (`sampling.step_weight`); None: every step, or no adapter."""
    return (manifest.get("adapter") or {}).get("from_t")


def _export_component(name: str, model, adapter, spec: ExportSpec, out_dir: Path, opset: int, cfg: bool):
    module = onnx_export.component_module(name, model, adapter if name == "denoiser" else None, cfg,
                                          spec.precision, copy_weights=False)  # this export owns `model`
    weights = onnx_export.adapter_weights(module) if name == "denoiser" else {}
    start = time.perf_counter()
    files = onnx_export.export_onnx(module, spec, out_dir / f"{name}.onnx", opset, weights)
    entry = {"file": files[0].name, "files": [f.name for f in files], "spec": spec.to_json(),
             "export_seconds": round(time.perf_counter() - start, 2), **io_signature(files[0])}
    return entry, weights


def io_signature(onnx_path: Path) -> dict[str, Any]:
    """{"inputs": {name: {"shape": [...], "dtype": ...}}, "outputs": {...}} read back from the ONNX file;
    symbolic dims are strings."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def describe(values):
        return {vi.name: {"shape": [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim],
                          "dtype": helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name}
                for vi in values if vi.name not in inits}

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def build_manifest(root: Path, model, components: dict, adapter_info: dict | None, refit_map: dict,
                   options: dict) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **options,
        "components": components,
        "base_fingerprint": model.fingerprint,
        "base_model": str(Path(model.path).resolve()),  # absolute: `bench --export` and `refit` run elsewhere
        "adapter": adapter_info,
        "refit_map": refit_map,
        "latent_shape": list(model.latent_shape),
        "image_size": int(model.image_size),
        "scheduler_config": dict(model.scheduler_config),
        "files": file_hashes(root),
        "versions": artifacts.package_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative POSIX paths), the manifest excluded."""
    return {p.relative_to(root).as_posix(): artifacts.sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def read_manifest(export_dir: str | Path, verify: bool = True, flag: str = "--export") -> dict[str, Any]:
    """The export manifest; with `verify`, every listed file must exist with its recorded sha256. `flag`: the
    option that named the folder (for the error)."""
    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST_NAME).is_file():
        raise InvdiffError(f"{flag} {export_dir}: not an export folder (no {MANIFEST_NAME}); run `invdiff export` "
                           "first")
    manifest = artifacts.read_json(export_dir / MANIFEST_NAME, "export manifest")
    if manifest.get("format") != FORMAT:
        raise InvdiffError(f"{export_dir / MANIFEST_NAME}: not an invdiff-rt export manifest; re-run `invdiff export`")
    check_structure(manifest, export_dir / MANIFEST_NAME)
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            path = export_dir / rel
            if not path.is_file() or artifacts.sha256_file(path) != digest:
                raise InvdiffError(f"{path}: missing or changed since export (sha256 differs from {MANIFEST_NAME}); "
                                   "re-run `invdiff export`")
    return manifest


def check_structure(manifest: dict, path: Path) -> None:
    """The fields every reader indexes (the denoiser and every component's spec, refit map, latent shape, scheduler
    config) are there and well formed: a hand-edited manifest fails here in one line, not with a KeyError deep inside
    a backend. Every export since the first format has written all of them."""
    from ..method.adapter import check_record
    from ..runtime.sampling import check_scheduler_config

    try:
        if manifest.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"format_version {manifest.get('format_version')!r}, this invdiff-rt reads "
                             f"{FORMAT_VERSION}")
        for entry in manifest["components"].values():
            spec = ExportSpec.from_json(entry["spec"]) if "spec" in entry or "profile" not in entry else None
            if "profile" not in entry:  # a spec-less entry records its profile (older builds' layout)
                [int(d) for shapes in spec.profile().values() for s in shapes for d in s]
            if spec is not None and len(spec.sizes or (0, 0, 0)) != 3:
                raise ValueError("spec.sizes must be (min, opt, max)")
        if any(not isinstance(v, str) for v in dict(manifest.get("refit_map") or {}).values()):
            raise ValueError("refit_map values must be initializer names")
        manifest["components"]["denoiser"]
        if manifest.get("precision", "fp32") not in PRECISIONS:
            raise ValueError(f"precision {manifest.get('precision')!r}, not one of {', '.join(PRECISIONS)}")
        if len([int(d) for d in manifest["latent_shape"]]) != 3:
            raise ValueError("latent_shape must be (C, h, w)")
        check_scheduler_config(dict(manifest["scheduler_config"]))
        size = manifest.get("image_size", 1)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"image_size {size!r} is not a positive int")
        dict(manifest["files"])
        check_record(manifest.get("adapter") or {})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise InvdiffError(f"{path}: malformed ({type(e).__name__}: {e}); re-run `invdiff export`") from None


def component_spec(manifest: dict, name: str) -> ExportSpec:
    return ExportSpec.from_json(manifest["components"][name]["spec"])
