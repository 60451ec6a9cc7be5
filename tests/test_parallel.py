"""map_batches: order kept, exceptions surface, torch's thread setting restored, sequential on one thread."""

import threading

import pytest
import torch

from invdiff_rt.parallel import map_batches


@pytest.fixture
def threads():
    """Set torch's thread count for one test (`threads(n)`), restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_order_kept_and_batches_run_single_threaded_in_workers(threads):
    threads(2)
    caller, seen_threads, inner_threads = threading.get_ident(), set(), set()

    def fn(start: int) -> int:
        seen_threads.add(threading.get_ident())
        inner_threads.add(torch.get_num_threads())
        return start * 10

    assert map_batches(fn, range(0, 40, 4)) == [s * 10 for s in range(0, 40, 4)]
    assert inner_threads == {1} and caller not in seen_threads  # ran in the pool, one thread each
    assert torch.get_num_threads() == 2


def test_exception_propagates_and_threads_restored(threads):
    threads(2)

    def fn(start: int) -> int:
        if start == 8:
            raise ValueError("bad batch 8")
        return start

    with pytest.raises(ValueError, match="bad batch 8"):
        map_batches(fn, range(0, 16, 4))
    assert torch.get_num_threads() == 2


def test_single_thread_or_single_batch_runs_in_the_caller(threads):
    threads(1)
    caller = threading.get_ident()
    assert map_batches(lambda s: threading.get_ident() == caller, range(0, 9, 3)) == [True, True, True]
    threads(2)
    assert map_batches(lambda s: threading.get_ident() == caller, range(0, 3, 3)) == [True]
    assert map_batches(lambda s: threading.get_ident() == caller, range(0, 6, 3), device="meta") == [True, True]
