"""One sampling loop for every backend.

A backend is a `Runtime`: it encodes prompts, runs one fused denoising step (UNet + adapter + CFG) and decodes
latents. The loop below (diffusers schedulers) never asks which backend it drives, k-diffusion style.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from ..errors import InvdiffError

from .defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS, SCHEDULERS  # noqa: F401  (re-exported)


class Runtime(Protocol):
    name: str
    latent_shape: tuple[int, int, int]
    scheduler_config: dict

    def encode_text(self, prompts: list[str]) -> torch.Tensor: ...

    def denoise_step(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                     guidance_scale: float, adapter_weight: float) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def make_scheduler(config: dict, name: str = "ddim"):
    """diffusers scheduler from a model's scheduler config: DDIM (no x0 clipping), DPM-Solver++ or Euler."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if name == "ddim":
        return DDIMScheduler.from_config({**config, "clip_sample": False, "set_alpha_to_one": False})
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config({**config, "algorithm_type": "dpmsolver++"})
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise InvdiffError(f"--scheduler {name}: unknown; choose one of {', '.join(SCHEDULERS)}")


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what diffusers' schedulers step


def check_scheduler_config(config: dict) -> None:
    """A scheduler config the samplers can step (a hand-edited one failed at the first step): ValueError if not."""
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {config.get('prediction_type')!r} is not one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    try:
        make_scheduler(config).set_timesteps(2)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ValueError(f"not a scheduler config diffusers builds ({type(e).__name__})") from e


def item_seed(seed: int, prompt: str, index: int) -> int:
    """A 63-bit seed that depends only on (seed, prompt, index)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def initial_latents(seed: int, prompt: str, index: int, shape: Sequence[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(item_seed(seed, prompt, index))
    return torch.randn(tuple(shape), generator=gen)


FINITE_CHECK_EVERY = 8  # steps between host reads of the on-device finiteness flags (one sync per 8 steps)
FORCE_NAN_ENV = "INVDIFF_FORCE_NAN_STEP"  # test hook: the denoiser output of this step (1-based) becomes NaN


class FiniteGuard:
    """Collects one on-device `isfinite().all()` flag per step; `check()` reads them (one host sync) and raises a
    one-line error naming the component, the first bad step and the fix."""

    def __init__(self, runtime: Runtime, component: str = "denoiser"):
        self.runtime, self.component, self.flags = runtime, component, []

    def add(self, value: torch.Tensor) -> None:
        self.flags.append(torch.isfinite(value).all())

    def check(self, total: int | None = None) -> None:
        if not self.flags or bool(torch.stack(self.flags).all()):
            return
        first = int((~torch.stack(self.flags)).nonzero()[0, 0]) + 1
        where = f"at step {first} of {total}" if total else "in its output"
        raise InvdiffError(f"{getattr(self.runtime, 'name', 'runtime')} {self.component}: non-finite values "
                           f"(NaN/inf) {where}; no image was written for this batch; lower --guidance-scale or "
                           f"--adapter-weight, or if it ran in fp16/bf16 run it in fp32 (`invdiff export --precision "
                           f"fp32`, or --precision fp32)")


def _forced_nan(step: int, value: torch.Tensor) -> torch.Tensor:
    return value * float("nan") if os.environ.get(FORCE_NAN_ENV) == str(step) else value


def check_finite(runtime: Runtime, component: str, value: torch.Tensor) -> torch.Tensor:
    """Raise the one-line error when a component's output (text embeddings, images) is not finite."""
    guard = FiniteGuard(runtime, component)
    guard.add(value)
    guard.check()
    return value


def step_weight(runtime: Runtime, adapter_weight: float, t) -> float:
    """The adapter weight of the step at timestep `t`: 0 below the adapter's `from_t` (it acts only at the high t
    where the colour, background, ... is decided and leaves the shape to the base: targets.active_from_t), else
    `adapter_weight`. A runtime without `adapter_from_t` (or None) applies the weight at every step."""
    start = getattr(runtime, "adapter_from_t", None)
    return adapter_weight if start is None or float(t) >= start else 0.0


def denoise(runtime: Runtime, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
            guidance_scale: float, adapter_weight: float, steps: int,
            callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run `steps` scheduler steps. `text_embeddings` is [2B,L,D] (cond then uncond), or [B,L,D] without CFG.
    `callback(i, t, noise_pred)` sees every step's noise prediction (used by parity checks). A non-finite noise
    prediction stops the loop with a one-line error (checked on the device, read every FINITE_CHECK_EVERY steps)."""
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    batch = latents.shape[0]
    guard = FiniteGuard(runtime)
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(latents, t)
        t_batch = torch.full((batch,), float(t), dtype=torch.float32, device=latents.device)
        noise_pred = _forced_nan(i + 1, runtime.denoise_step(x_in, t_batch, text_embeddings, guidance_scale,
                                                             step_weight(runtime, adapter_weight, t)))
        guard.add(noise_pred)
        if (i + 1) % FINITE_CHECK_EVERY == 0:
            guard.check(len(scheduler.timesteps))
        if callback is not None:
            callback(i, t, noise_pred)
        latents = scheduler.step(noise_pred.to(latents.dtype), t, latents, return_dict=False)[0]
    guard.check(len(scheduler.timesteps))
    return latents


def cfg_embeddings(runtime: Runtime, prompts: list[str], guidance_scale: float,
                   cache: dict | None = None) -> torch.Tensor:
    """[2B,L,D] cond-then-uncond embeddings (or [B,L,D] when the runtime has no CFG branch)."""
    cache = {} if cache is None else cache
    unique = [p for p in dict.fromkeys(list(prompts) + [""]) if p not in cache]
    if unique:
        for p, e in zip(unique, runtime.encode_text(unique)):
            cache[p] = e
    cond = torch.stack([cache[p] for p in prompts])
    if not getattr(runtime, "cfg", True):
        return cond
    return torch.cat([cond, cache[""].expand_as(cond)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [0,1] -> uint8 [B,H,W,3] (round to nearest)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def as_runtime(model_or_runtime, adapter=None) -> Runtime:
    if hasattr(model_or_runtime, "denoise_step"):
        if adapter is not None:
            raise InvdiffError("--adapter: pass the adapter when building the runtime, not to the sampler")
        return model_or_runtime
    from .backends.torch_backend import TorchRuntime

    return TorchRuntime(model_or_runtime, adapter)


def sample_batch(runtime: Runtime, prompts: list[str], indices: list[int], seed: int, steps: int,
                 guidance_scale: float, adapter_weight: float, scheduler: str, embed_cache: dict,
                 latent_shape: Sequence[int] | None = None) -> np.ndarray:
    shape = latent_shape or runtime.latent_shape
    latents = torch.stack([initial_latents(seed, p, i, shape) for p, i in zip(prompts, indices)])
    device = getattr(runtime, "device", torch.device("cpu"))
    emb = cfg_embeddings(runtime, prompts, guidance_scale, embed_cache)
    sched = make_scheduler(runtime.scheduler_config, scheduler)
    out = denoise(runtime, sched, latents.to(device), check_finite(runtime, "text_encoder", emb), guidance_scale,
                  adapter_weight, steps)
    return to_uint8(check_finite(runtime, "vae_decoder", runtime.decode(out)))


def sample_images(model_or_runtime, prompts: Sequence[str], indices: Sequence[int], seed: int,
                  steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, adapter=None,
                  adapter_weight: float = 1.0, scheduler: str = "ddim", batch_size: int = 64,
                  progress: Callable[[int], None] | None = None,
                  latent_shape: Sequence[int] | None = None) -> np.ndarray:
    """Images for (prompts[i], indices[i]) as uint8 [N,H,W,3]; item i does not depend on its batch mates (on torch,
    the batch size itself can move a pixel by 1/255: `generate.batch_settings`).
    `latent_shape` (C, h, w): another size than the runtime's default (checked by `runtime.resolution`)."""
    if len(prompts) != len(indices):
        raise ValueError("prompts and indices must have the same length")
    runtime = as_runtime(model_or_runtime, adapter)
    cache: dict = {}
    chunks = []
    for start in range(0, len(prompts), batch_size):
        p, i = list(prompts[start:start + batch_size]), list(indices[start:start + batch_size])
        chunks.append(sample_batch(runtime, p, i, seed, steps, guidance_scale, adapter_weight, scheduler, cache,
                                   latent_shape))
        if progress is not None:
            progress(len(p))
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)
