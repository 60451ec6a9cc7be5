"""CUDA-graph capture of one fused denoising step per input shape (no host sync inside the denoising loop)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def graphed_step(module: Callable, inputs: Sequence[torch.Tensor], warmup: int = 3) -> Callable:
    """Capture `module(*inputs)` once; the returned callable copies new inputs into the static buffers and replays.

    The returned tensor is the graph's static output: it is overwritten by the next replay."""
    static_in = [x.clone() for x in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # cuBLAS/cuDNN workspaces are allocated before capture, on a side stream
            module(*static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = module(*static_in)

    def step(*new_inputs: torch.Tensor) -> torch.Tensor:
        for buf, x in zip(static_in, new_inputs):
            if buf.data_ptr() != x.data_ptr():
                buf.copy_(x, non_blocking=True)
        graph.replay()
        return static_out

    return step


def shape_key(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)
