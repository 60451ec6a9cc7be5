"""The PyTorch backend: eager reference (CPU or CUDA) around the fused step."""

from __future__ import annotations

import torch

from ..fused import FusedDenoiser


class TorchRuntime:
    name = "torch"

    def __init__(self, model, adapter=None, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, cfg: bool = True):
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype
        self.cfg = cfg
        self.fused = FusedDenoiser(model.unet, adapter, cfg).to(self.device, dtype).eval()
        self.latent_shape = model.latent_shape
        self.scheduler_config = model.scheduler_config

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(prompts).to(self.device, self.dtype)

    @torch.inference_mode()
    def denoise_step(self, sample, timestep, text_embeddings, guidance_scale: float, adapter_weight: float):
        gs = torch.tensor(guidance_scale, dtype=torch.float32, device=self.device)
        aw = torch.tensor(adapter_weight, dtype=torch.float32, device=self.device)
        return self.fused(sample.to(self.dtype), timestep.to(self.device), text_embeddings.to(self.dtype), gs, aw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents.float())
