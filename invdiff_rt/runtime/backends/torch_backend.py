"""The PyTorch backend: on CPU the fused step, traced per batch shape for small batches from a shape's `TRACE_AT`-th
call (bit-identical to eager, `traced.py`; the adapter skipped at weight 0); on CUDA, fp16 and one CUDA graph of the
fused step per batch shape."""

from __future__ import annotations

import torch

from ..fused import FusedDenoiser
from ..traced import Traced


class TorchRuntime:
    name = "torch"

    def __init__(self, model, adapter=None, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, cfg: bool = True, cuda_graphs: bool | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype
        self.cfg = cfg
        self.fused = FusedDenoiser(model.unet, adapter, cfg).to(self.device, dtype).eval()
        self.base_fused = FusedDenoiser(model.unet, None, cfg)  # same UNet: steps at weight 0 skip the adapter
        self._traced = Traced(self.fused), Traced(self.base_fused)  # CPU; eager elsewhere
        self.adapter_from_t = getattr(adapter, "from_t", None)  # sampling.step_weight
        self.latent_shape = model.latent_shape
        self.scheduler_config = model.scheduler_config
        self.tokenizer = model.tokenizer
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict = {}
        if self.device.type == "cuda":
            self.name = "torch-cuda"

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(prompts).to(self.device, self.dtype)

    def _scalars(self, guidance_scale: float, adapter_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(guidance_scale, dtype=torch.float32, device=self.device),
                torch.tensor(adapter_weight, dtype=torch.float32, device=self.device))

    @torch.inference_mode()
    def denoise_step(self, sample, timestep, text_embeddings, guidance_scale: float, adapter_weight: float):
        inputs = (sample.to(self.device, self.dtype), timestep.to(self.device, torch.float32),
                  text_embeddings.to(self.device, self.dtype), *self._scalars(guidance_scale, adapter_weight))
        if not self.cuda_graphs:  # eps + 0 * delta == eps: below from_t the adapter is not run (export/gate.py)
            return self._traced[adapter_weight == 0](*inputs)
        from ..cuda_graphs import graphed_step, shape_key

        key = shape_key(inputs)
        if key not in self._graphs:
            self._graphs[key] = graphed_step(self.fused, inputs)
        return self._graphs[key](*inputs).clone()  # the static output is overwritten by the next replay

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents.float())
