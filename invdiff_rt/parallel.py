"""Independent batches of small-model inference, run concurrently on a multi-core CPU."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def map_batches(fn: Callable[[int], T], starts: range, device: torch.device | str = "cpu") -> list[T]:
    """fn over the batch starts, in order. On a multi-core CPU the batches run in as many single-threaded workers as
    torch has threads: on a 2-core machine two 1-thread UNet calls side by side are 15-25 % faster than one 2-thread
    call (small convolutions do not split well across cores). The thread setting is restored afterwards."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads < 2 or len(starts) < 2:
        return [fn(s) for s in starts]
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            return list(pool.map(fn, starts))
    finally:
        torch.set_num_threads(threads)
