"""Backend registry: every backend returns a `Runtime` (see `runtime.sampling`); `auto` picks the fastest present.

Preference for `auto`: tensorrt > onnxruntime-cuda > torch-cuda > openvino (CPU) > onnxruntime (CPU) > torch (CPU)
(openvino before onnxruntime on CPU: measured faster end to end, bench/README.md). Engine and ONNX
backends run from an export folder (`export_dir`); the torch backends run from a loaded model (+ adapter).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

from ...errors import InvdiffError

BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "openvino", "onnxruntime", "torch")
NEEDS_EXPORT = ("tensorrt", "onnxruntime-cuda", "openvino", "onnxruntime")


@lru_cache(maxsize=None)
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _ort_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401  (PyPI stubs and missing libs raise here)
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False
    return _cuda()


def is_available(name: str) -> bool:
    """Whether the backend's libraries and device are present (not whether its inputs were given)."""
    checks = {"tensorrt": _tensorrt, "onnxruntime-cuda": lambda: _cuda() and _ort_cuda(), "torch-cuda": _cuda,
              "onnxruntime": lambda: importlib.util.find_spec("onnxruntime") is not None, "torch": lambda: True,
              "openvino": lambda: importlib.util.find_spec("openvino") is not None}
    return checks[name]()


def resolve_backend(name: str, export_dir=None, model=None) -> str:
    """`auto` -> the first available backend (given an export folder and/or a model, only those that can use
    them); any other name is checked and returned."""
    if name != "auto":
        if name not in BACKENDS:
            raise InvdiffError(f"--backend {name}: unknown; choose auto or one of {', '.join(BACKENDS)}")
        return name
    for candidate in BACKENDS:
        if not _usable_inputs(candidate, export_dir, model):
            continue
        if is_available(candidate):
            return candidate
    raise InvdiffError("--backend auto: no backend can run with these inputs; pass --model or --export")


def _usable_inputs(name: str, export_dir, model) -> bool:
    if export_dir is None and model is None:
        return True
    if name == "openvino" and export_dir is not None:
        return _export_precision(export_dir) == "fp32"  # fp16 exports are for GPUs; onnxruntime runs them on CPU
    return export_dir is not None if name in NEEDS_EXPORT else model is not None


def _export_precision(export_dir) -> str:
    """The export's precision; a folder without a manifest counts as fp32 (loading it reports what is wrong)."""
    from pathlib import Path

    from ...artifacts import read_json
    from ...export.manifest import MANIFEST_NAME

    path = Path(export_dir) / MANIFEST_NAME
    return read_json(path, "export manifest").get("precision", "fp32") if path.is_file() else "fp32"


def load_runtime(backend: str, *, model=None, adapter=None, export_dir=None, precision: str = "fp32",
                 threads: int | None = None, spinning: bool = True, engines_dir=None, refit_adapter=None,
                 cfg: bool = True):
    """A `Runtime` for `backend` (already resolved). ONNX/TensorRT need `export_dir`; torch needs `model` (and `cfg`:
    False for the --no-cfg step; an export's runtime reads it from the export). `refit_adapter` (TensorRT): the
    adapter folder `invdiff refit` put into the denoiser engine."""
    backend = resolve_backend(backend, export_dir, model)
    if backend in NEEDS_EXPORT and export_dir is None:
        raise InvdiffError(f"--backend {backend}: needs an export folder; pass --export (from `invdiff export`)")
    if backend == "tensorrt":
        from .tensorrt_backend import load

        return load(export_dir, engines_dir or "engines", adapter_dir=refit_adapter)
    if backend == "openvino":
        from .openvino_backend import OvRuntime

        return OvRuntime(export_dir, threads=threads, precision=precision)
    if backend == "onnxruntime-cuda" and not is_available(backend):
        raise InvdiffError("--backend onnxruntime-cuda: needs a CUDA GPU and the onnxruntime-gpu package (pip install "
                           "'invdiff-rt[gpu]'); use --backend onnxruntime on this machine")
    if backend in ("onnxruntime", "onnxruntime-cuda"):
        from .onnxruntime_backend import OrtRuntime

        return OrtRuntime(export_dir, cuda=backend == "onnxruntime-cuda", threads=threads, spinning=spinning)
    return _torch_runtime(backend, model, adapter, precision, threads, cfg)


def _torch_runtime(backend: str, model, adapter, precision: str, threads: int | None, cfg: bool):
    import torch

    if model is None:
        raise InvdiffError(f"--backend {backend}: needs the model; pass --model")
    if threads:
        torch.set_num_threads(int(threads))
    from .torch_backend import TorchRuntime

    if backend == "torch-cuda":
        if not _cuda():
            raise InvdiffError("--backend torch-cuda: no CUDA GPU visible; use --backend torch")
        dtype = torch.float16 if precision == "fp16" else torch.float32
        return TorchRuntime(model, adapter, device="cuda", dtype=dtype, cfg=cfg)
    return TorchRuntime(model, adapter, device="cpu", cfg=cfg)
