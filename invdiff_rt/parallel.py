"""Torch's CPU thread pool: one thread for a block of tiny ops, or independent batches in single-threaded workers."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[int]:
    """Run the block with torch on one intra-op thread; yields the previous count, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def map_batches(fn: Callable[[int], T], starts: range, device: torch.device | str = "cpu") -> list[T]:
    """fn over the batch starts, in order. On a multi-core CPU the batches run in as many single-threaded workers as
    torch has threads: on a 2-core machine two 1-thread UNet calls side by side are 15-25 % faster than one 2-thread
    call (small convolutions do not split well across cores). The thread setting is restored afterwards."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() < 2 or len(starts) < 2:
        return [fn(s) for s in starts]
    from concurrent.futures import ThreadPoolExecutor

    with one_torch_thread() as threads, ThreadPoolExecutor(min(threads, len(starts))) as pool:
        return list(pool.map(fn, starts))
