"""The fused denoising step: frozen UNet + guidance adapter + classifier-free guidance in one module.

This is the unit that is exported to ONNX, built into TensorRT engines and captured in CUDA graphs:

    eps(c)   = eps_unet(x, t, c) + w * adapter(x, t, c, eps_unet(x, t, c))      (both CFG branches)
    noise    = eps(uncond) + s * (eps(cond) - eps(uncond))

`guidance_scale` (s) and `adapter_weight` (w) are runtime tensor inputs, never traced constants. The batch is doubled
once (one UNet call at 2B), split by slicing (a `chunk` makes the exporter specialise the batch), and the adapter
shift and the CFG combine are computed in fp32 even when the UNet runs in fp16.
"""

from __future__ import annotations

import torch
from torch import nn


class FusedDenoiser(nn.Module):
    def __init__(self, unet: nn.Module, adapter: nn.Module | None = None, cfg: bool = True):
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        self.cfg = cfg

    def guided_eps(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                   adapter_weight: torch.Tensor) -> torch.Tensor:
        """eps_base + w * adapter, per branch, returned in fp32."""
        eps = self.unet(sample, timestep, text_embeddings, return_dict=False)[0]
        eps32 = eps.float()
        if self.adapter is None:
            return eps32
        delta = self.adapter(sample, timestep, text_embeddings, eps).float()
        return eps32 + adapter_weight.float() * delta

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                guidance_scale: torch.Tensor, adapter_weight: torch.Tensor) -> torch.Tensor:
        if not self.cfg:
            return self.guided_eps(sample, timestep, text_embeddings, adapter_weight).to(sample.dtype)
        batch = sample.shape[0]
        eps = self.guided_eps(torch.cat([sample, sample]), torch.cat([timestep, timestep]), text_embeddings,
                              adapter_weight)
        eps_cond, eps_uncond = eps[:batch], eps[batch:]
        out = eps_uncond + guidance_scale.float() * (eps_cond - eps_uncond)
        return out.to(sample.dtype)
