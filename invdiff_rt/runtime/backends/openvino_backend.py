"""OpenVINO backend (CPU): the `Runtime` protocol over the same export folder as ONNX Runtime.

OpenVINO reads our fused ONNX graphs directly. Each component is compiled once per input-shape set, reshaped to
static shapes first (shape specialisation: the CPU plugin picks better kernels for static shapes than for dynamic
ones), with the LATENCY hint, one stream and `threads` inference threads. Precision is pinned: `fp32` sets
INFERENCE_PRECISION_HINT=f32, because on AMX/avx512_bf16 CPUs OpenVINO otherwise runs bf16 by default, which is lossy;
`bf16` (opt-in) lets it use bf16 kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import InvdiffError
from ...export.manifest import component_spec, read_manifest

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def compile_config(threads: int | None = None, precision: str = "fp32") -> dict[str, str]:
    """CPU plugin properties: latency hint, one stream, pinned inference precision, optional thread count."""
    if precision not in PRECISION_HINTS:
        raise InvdiffError(f"--precision {precision}: the openvino backend runs fp32 or bf16")
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
              "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    return config


def _numpy(x, dtype: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.dtype(dtype)))


class OvComponent:
    """One ONNX graph + its spec: `__call__(**inputs)` -> first output as a torch tensor (a copy)."""

    def __init__(self, core, path: Path, spec, config: dict[str, str]):
        self.core, self.spec, self.config = core, spec, config
        self.model = core.read_model(str(path))
        self.input_names = [p.get_any_name() for p in self.model.inputs]
        self.requests: dict[tuple, object] = {}

    def request(self, arrays: dict[str, np.ndarray]):
        """The infer request compiled for exactly these input shapes (compiled on first use)."""
        key = tuple(arrays[name].shape for name in self.input_names)
        if key not in self.requests:
            model = self.model.clone()
            model.reshape({name: list(arrays[name].shape) for name in self.input_names})
            self.requests[key] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.requests[key]

    def __call__(self, **inputs) -> torch.Tensor:
        arrays = {name: _numpy(inputs[name], self.spec.dtype(name)) for name in self.input_names}
        req = self.request(arrays)
        req.infer(arrays)
        return torch.from_numpy(req.get_output_tensor(0).data.copy())


class OvRuntime:
    """The `Runtime` protocol on OpenVINO CPU compiled models built from an export folder alone."""

    name = "openvino"

    def __init__(self, export_dir: str | Path, threads: int | None = None, precision: str = "fp32",
                 verify: bool = True):
        import openvino as ov

        from .onnxruntime_backend import _tokenizer

        export_dir = Path(export_dir)
        self.manifest = read_manifest(export_dir, verify=verify)
        if self.manifest.get("precision", "fp32") != "fp32":
            raise InvdiffError(f"--export {export_dir}: the openvino backend needs an fp32 export (bf16 is a "
                               "compile option: --precision bf16); re-run `invdiff export --precision fp32`")
        self.device = torch.device("cpu")
        self.cfg = bool(self.manifest.get("cfg", True))
        self.precision = precision
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.scheduler_config = self.manifest["scheduler_config"]
        core, config = ov.Core(), compile_config(threads, precision)
        self.components = {name: OvComponent(core, export_dir / entry["file"], component_spec(self.manifest, name),
                                             config)
                           for name, entry in self.manifest["components"].items()}
        self.tokenizer = _tokenizer(export_dir)

    def _component(self, name: str) -> OvComponent:
        if name not in self.components:
            raise InvdiffError(f"--export: {name}.onnx is not in this export; re-run `invdiff export`")
        return self.components[name]

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="np").input_ids
        return self._component("text_encoder")(input_ids=ids)

    def denoise_step(self, sample, timestep, text_embeddings, guidance_scale: float, adapter_weight: float):
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        return self._component("denoiser")(sample=sample, timestep=timestep, text_embeddings=text_embeddings,
                                           guidance_scale=float(guidance_scale),
                                           adapter_weight=float(adapter_weight))

    def decode(self, latents) -> torch.Tensor:
        return self._component("vae_decoder")(latents=latents).float()
