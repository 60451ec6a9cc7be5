"""Frozen modules on CPU, traced (`torch.jit.trace`) once per input shape: the same aten ops without diffusers'
Python around them, so the outputs are bit-identical to eager, in less time where that Python is a visible part of
a call. Styled-digits' UNet (8x8 latents, one thread, two calls side by side as the workers run them; median of 5
interleaved rounds, `bench/traced_unet.py`, bench/results/traced_cpu_unet.json): traced/eager 0.57x at batch 8,
0.83x at 32, 0.85x at 64, 0.95x at 128, 1.00x at 256. A trace takes 0.4-0.8 s to make, what 75-85 calls at batch
8-32 save, so a shape is traced at its `TRACE_AT`-th call: the adapter's 6,500 training steps (batch 32) take 16-22 %
less time (bench/results/traced_cpu_train.json), and a short run (a few images, a test) pays nothing. Calls above
`MAX_ELEMENTS` run eagerly. The CUDA path keeps its CUDA graphs (cuda_graphs.py); a module that cannot be traced
runs eagerly."""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from typing import Callable

import torch
from torch import nn

from .cuda_graphs import shape_key

log = logging.getLogger(__name__)

MAX_ELEMENTS = 8192  # traced up to this many elements in the first input: 32 latents of 4x8x8, a UNet batch of 64
# in the fused step (which doubles it for CFG); one SD latent at 512 px has 16,384
TRACE_AT = 100  # a shape's calls before it is traced (eager until then)


class Traced:
    """`module(*tensors) -> tensor` (or `wrap(module)(*tensors)`), traced at its `TRACE_AT`-th call with an input shape
    and grad mode, on CPU. It holds the module weakly, and a trace does not hold it: a cached `Traced` keeps no model
    alive."""

    def __init__(self, module: nn.Module, wrap: Callable[[nn.Module], Callable] | None = None):
        self._module = weakref.ref(module)
        self._wrap = wrap
        self._graphs: dict = {}  # key -> trace (None: untraceable)
        self._calls: dict = {}  # key -> eager calls so far
        self._lock = threading.Lock()  # workers share one trace of a shape

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        small_cpu = inputs[0].device.type == "cpu" and inputs[0].numel() <= MAX_ELEMENTS
        graph = self._graph(inputs) if small_cpu else None
        return (self._eager() if graph is None else graph)(*inputs)

    def _eager(self) -> Callable[..., torch.Tensor]:
        module = self._module()
        return self._wrap(module) if self._wrap else module

    def _graph(self, inputs: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor] | None:
        """This shape's trace: made at its `TRACE_AT`-th call; None before, or where the module cannot be traced."""
        key = (*shape_key(inputs), torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        with self._lock:
            if key not in self._graphs:
                self._calls[key] = self._calls.get(key, 0) + 1
                if self._calls[key] >= TRACE_AT:
                    self._graphs[key] = _trace(self._eager(), inputs)
            return self._graphs.get(key)


def _trace(module: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor] | None:
    """The trace, or None where the module cannot be traced (it then runs eagerly)."""
    try:
        with warnings.catch_warnings():  # TracerWarnings about diffusers' shape checks, fixed for this shape
            warnings.simplefilter("ignore")
            return torch.jit.trace(module, inputs, check_trace=False)
    except Exception as e:  # noqa: BLE001 - an untraceable module is still a module
        log.debug("running %s eagerly: %s", type(module).__name__, e)
        return None


class _Eps(nn.Module):
    """A UNet called as `unet(sample, timestep, encoder_hidden_states=...).sample`, as one positional tensor call."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=text).sample


_EPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EPS_LOCK = threading.Lock()


def traced_eps(unet: nn.Module) -> Traced:
    """`eps(sample, timestep, text)`: the UNet's (or a `splits.ShiftedUNet`'s) prediction, traced per shape; one per
    module, so every caller (the training's base predictions, the loss code) shares its call counts and traces."""
    with _EPS_LOCK:
        if unet not in _EPS:
            _EPS[unet] = Traced(unet, _Eps)
        return _EPS[unet]
