"""ONNX Runtime backend: the `Runtime` protocol over an export folder (text encoder, fused denoiser, VAE decoder).

CPU EP: numpy feeds (0-d scalars as `np.array(x, np.float32)`), configurable intra-op threads, spinning off on
request (a spinning pool steals cores from anything else in the process), the denoiser's adapter under an `If` that
skips it at weight 0 (export/gate.py). CUDA EP (onnxruntime-gpu): torch CUDA tensors bound with I/O binding,
outputs written into preallocated torch buffers (no host copies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import InvdiffError
from ...export.gate import cpu_model_source
from ...export.manifest import adapter_from_t, component_spec, read_manifest
from ...export.onnx_export import external_data_path
from ...models.loader import tokenize

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


LOW_MEMORY_BYTES = 2**30  # external data above 1 GiB (SD-scale UNets): `low_memory` session options


def session_options(threads: int | None = None, spinning: bool = True, low_memory: bool = False):
    """`low_memory` (SD-scale, measured on SD 1.5: a 3.4 GB UNet took 9 GiB in a default CPU session): no NCHWc
    layout transform (it keeps reordered copies of the conv weights), no weight prepacking, no memory arena."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if low_memory:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def make_session(path: str | Path, cuda: bool = False, threads: int | None = None, spinning: bool = True,
                 spec=None):
    """A session on `path`; on CPU with the denoiser's `spec`, on its adapter-gated graph (export/gate.py)."""
    import onnxruntime as ort

    if cuda and CUDA not in ort.get_available_providers():
        raise InvdiffError("--backend onnxruntime-cuda: this onnxruntime has no CUDAExecutionProvider; "
                           "pip install 'invdiff-rt[gpu]' (onnxruntime-gpu) or use --backend onnxruntime")
    providers = [(CUDA, {"device_id": cuda_index()}), CPU] if cuda else [CPU]
    data = external_data_path(path)
    low_memory = not cuda and data.is_file() and data.stat().st_size > LOW_MEMORY_BYTES
    source = cpu_model_source(path, spec) if spec is not None and not cuda else str(path)
    return ort.InferenceSession(source, sess_options=session_options(threads, spinning, low_memory),
                                providers=providers)


def cuda_index() -> int:
    """The GPU this process runs on: torch's current device, which `generate` sets to LOCAL_RANK under torchrun
    (the session and its I/O binding used GPU 0 on every rank)."""
    return torch.cuda.current_device()


def _numpy(x, dtype: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.dtype(dtype)))


class OrtComponent:
    """One session + its spec: `__call__(**inputs)` -> first output as a torch tensor (CPU, or CUDA when bound)."""

    def __init__(self, path: Path, spec, cuda: bool = False, threads: int | None = None, spinning: bool = True):
        self.spec, self.cuda = spec, cuda
        self.session = make_session(path, cuda, threads, spinning, spec)
        self.device = torch.device("cuda", cuda_index()) if cuda else torch.device("cpu")
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, **inputs) -> torch.Tensor:
        feeds = {name: inputs[name] for name in self.input_names}
        return self._run_cuda(feeds) if self.cuda else self._run_cpu(feeds)

    def _run_cpu(self, feeds: dict) -> torch.Tensor:
        arrays = {name: _numpy(x, self.spec.dtype(name)) for name, x in feeds.items()}
        return torch.from_numpy(self.session.run([self.spec.output_names[0]], arrays)[0])

    def _run_cuda(self, feeds: dict) -> torch.Tensor:
        """I/O binding on torch CUDA buffers; the batch comes from the first input's leading dim."""
        binding, index = self.session.io_binding(), self.device.index
        keep = []
        for name, x in feeds.items():
            t = torch.as_tensor(x, dtype=getattr(torch, self.spec.dtype(name)), device=self.device).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", index, np.dtype(self.spec.dtype(name)).type, tuple(t.shape), t.data_ptr())
        batch = _batch_of(self.spec, feeds)
        out_name = self.spec.output_names[0]
        out = torch.empty(self.spec.shapes(batch, _size_of(self.spec, feeds))[out_name],
                          dtype=getattr(torch, self.spec.dtype(out_name)), device=self.device)
        binding.bind_output(out_name, "cuda", index, np.dtype(self.spec.dtype(out_name)).type, tuple(out.shape),
                            out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


def _size_of(spec, feeds: dict) -> tuple[int, int] | None:
    """Image size (H, W) of a dynamic-resolution component's feeds (its first input is the latents)."""
    if spec.sizes is None:
        return None
    h, w = feeds[spec.inputs[0].name].shape[-2:]
    return (int(h) * spec.downsample, int(w) * spec.downsample)


def _batch_of(spec, feeds: dict) -> int:
    first = spec.inputs[0]
    axis, symbol = next(iter(first.dynamic_axes.items()))
    return int(feeds[first.name].shape[axis]) // (2 if symbol == "2B" else 1)


class ExportRuntime:
    """The `Runtime` calls shared by the runtimes built from an export folder: `self.components` maps component
    names to callables taking the spec's named inputs (onnxruntime, openvino)."""

    @property
    def adapter_from_t(self) -> int | None:  # sampling.step_weight
        return adapter_from_t(self.manifest)

    def _component(self, name: str):
        if name not in self.components:
            raise InvdiffError(f"--export: {name}.onnx is not in this export; re-run `invdiff export`")
        return self.components[name]

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._component("text_encoder")(input_ids=tokenize(self.tokenizer, prompts, return_tensors="np"))

    def denoise_step(self, sample, timestep, text_embeddings, guidance_scale: float, adapter_weight: float):
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        return self._component("denoiser")(sample=sample, timestep=timestep, text_embeddings=text_embeddings,
                                           guidance_scale=float(guidance_scale),
                                           adapter_weight=float(adapter_weight))

    def decode(self, latents) -> torch.Tensor:
        return self._component("vae_decoder")(latents=latents).float()


class OrtRuntime(ExportRuntime):
    """The `Runtime` protocol on ONNX Runtime sessions built from an export folder alone."""

    def __init__(self, export_dir: str | Path, cuda: bool = False, threads: int | None = None,
                 spinning: bool = True, verify: bool = True):
        export_dir = Path(export_dir)
        self.manifest = read_manifest(export_dir, verify=verify)
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime"
        self.device = torch.device("cuda", cuda_index()) if cuda else torch.device("cpu")
        self.cfg = bool(self.manifest.get("cfg", True))
        self.precision = self.manifest.get("precision", "fp32")
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.scheduler_config = self.manifest["scheduler_config"]
        self.components = {
            name: OrtComponent(export_dir / entry["file"], component_spec(self.manifest, name), cuda, threads,
                               spinning)
            for name, entry in self.manifest["components"].items()
        }
        self.tokenizer = _tokenizer(export_dir)


def _tokenizer(export_dir: Path):
    path = export_dir / "tokenizer"
    if not path.is_dir():
        raise InvdiffError(f"--export {export_dir}: no tokenizer/ folder; re-run `invdiff export`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
