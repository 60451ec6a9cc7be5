"""Parity between backends on the same seeded inputs (`invdiff check`).

The torch runtime is the reference. For each batch size the reference runs the shared sampling loop
(`sampling.denoise`) while its step inputs are recorded; every other backend then
- encodes the same prompts (text_embeddings),
- runs each recorded step input (noise_pred, step i): isolates the per-step error from drift,
- runs the whole loop itself from the same initial latents and decodes (final latents, images).
Each comparison reports max |a - b| and rel-L2 = ||a - b|| / ||b||, against thresholds per precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from .sampling import denoise, initial_latents, make_scheduler

# rel-L2 thresholds. fp32: ORT vs torch measures ~6e-6 per step (1e-4 leaves margin, catches real bugs).
# fp16 graphs (fp32 CFG combine / adapter shift): ~1e-3 per step on tiny models; 2e-2 per step, 5e-2 end to end.
THRESHOLDS = {
    "fp32": {"text_embeddings": 1e-4, "noise_pred": 1e-4, "latents": 1e-3, "images": 1e-3},
    "fp16": {"text_embeddings": 2e-2, "noise_pred": 2e-2, "latents": 5e-2, "images": 5e-2},
}
PROMPTS = ("a red circle", "a blue square", "a green triangle", "a photo")


@dataclass
class Row:
    batch: int
    backend: str
    quantity: str
    max_abs: float
    rel_l2: float
    threshold: float
    passed: bool


def metrics(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, ||a - b|| / ||b||) in float64."""
    a = np.asarray(candidate.detach().cpu().double().numpy())
    b = np.asarray(reference.detach().cpu().double().numpy())
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    diff = a - b
    return float(np.abs(diff).max()), float(np.linalg.norm(diff) / max(np.linalg.norm(b), 1e-30))


class Recorder:
    """Wraps a runtime; keeps (inputs, output) of every denoise_step."""

    def __init__(self, runtime):
        self.runtime, self.steps = runtime, []
        self.name, self.latent_shape = runtime.name, runtime.latent_shape
        self.scheduler_config, self.cfg = runtime.scheduler_config, getattr(runtime, "cfg", True)
        self.adapter_from_t = getattr(runtime, "adapter_from_t", None)

    def encode_text(self, prompts):
        return self.runtime.encode_text(prompts)

    def denoise_step(self, sample, timestep, text_embeddings, guidance_scale, adapter_weight):
        out = self.runtime.denoise_step(sample, timestep, text_embeddings, guidance_scale, adapter_weight)
        self.steps.append(((sample.clone(), timestep.clone(), text_embeddings, adapter_weight),
                           out.detach().float().cpu()))
        return out

    def decode(self, latents):
        return self.runtime.decode(latents)


@dataclass
class Trace:
    text_embeddings: torch.Tensor
    steps: list
    latents: torch.Tensor
    images: torch.Tensor


def embeddings(runtime, prompts: list[str], cfg: bool) -> torch.Tensor:
    """[2B,L,D] cond-then-uncond (or [B,L,D] without CFG), encoded in one call."""
    encoded = runtime.encode_text(list(prompts) + ([""] if cfg else [])).float().cpu()
    if not cfg:
        return encoded
    cond = encoded[: len(prompts)]
    return torch.cat([cond, encoded[-1:].expand_as(cond)])


def run_trace(runtime, prompts: list[str], seed: int, steps: int, scheduler: str, guidance_scale: float,
              adapter_weight: float, cfg: bool) -> Trace:
    """The shared sampling loop from seeded latents; records each step when `runtime` is a Recorder."""
    latents = torch.stack([initial_latents(seed, p, i, runtime.latent_shape) for i, p in enumerate(prompts)])
    emb = embeddings(runtime, prompts, cfg)
    sched = make_scheduler(runtime.scheduler_config, scheduler)
    device = getattr(runtime, "device", torch.device("cpu"))  # a GPU runtime steps its own outputs, as sampling does
    out = denoise(runtime, sched, latents.to(device), emb, guidance_scale, adapter_weight, steps)
    images = runtime.decode(out).float().cpu()
    return Trace(emb, getattr(runtime, "steps", []), out.float().cpu(), images)


def compare(reference: Trace, runtime, batch: int, precision: str, settings: dict) -> list[Row]:
    """Rows for one backend against the reference trace at one batch size."""
    limits = THRESHOLDS[precision]
    rows = []

    def add(quantity: str, kind: str, value: torch.Tensor, ref: torch.Tensor) -> None:
        max_abs, rel = metrics(value.float(), ref)
        rows.append(Row(batch, runtime.name, quantity, max_abs, rel, limits[kind], bool(rel <= limits[kind])))

    prompts = _prompts(batch)
    add("text_embeddings", "text_embeddings", embeddings(runtime, prompts, settings["cfg"]), reference.text_embeddings)
    for i, ((sample, t, emb, weight), ref_out) in enumerate(reference.steps):
        out = runtime.denoise_step(sample, t, emb, settings["guidance_scale"], weight)
        add(f"noise_pred[{i}]", "noise_pred", out.cpu(), ref_out)
    trace = run_trace(runtime, prompts, **settings)
    add("final latents", "latents", trace.latents, reference.latents)
    add("images", "images", trace.images, reference.images)
    return rows


def _prompts(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def run_parity(reference, candidates: Sequence, batch_sizes: Sequence[int], steps: int = 4, seed: int = 0,
               scheduler: str = "ddim", guidance_scale: float = 3.0, adapter_weight: float = 1.0,
               precision: str = "fp32", cfg: bool = True) -> list[Row]:
    """Compare every candidate runtime with the reference runtime at every batch size."""
    settings = dict(seed=seed, steps=steps, scheduler=scheduler, guidance_scale=guidance_scale if cfg else 1.0,
                    adapter_weight=adapter_weight, cfg=cfg)
    rows: list[Row] = []
    for batch in batch_sizes:
        recorder = Recorder(reference)
        ref = run_trace(recorder, _prompts(batch), **settings)
        for runtime in candidates:
            rows += compare(ref, runtime, batch, precision, settings)
    return rows


def summary(rows: list[Row]) -> dict:
    return {"passed": all(r.passed for r in rows), "rows": [asdict(r) for r in rows]}
