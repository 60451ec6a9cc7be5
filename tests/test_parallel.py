"""map_batches and map_ahead: order kept, exceptions surface, torch's thread setting restored, sequential on one
thread (map_batches) or off the CPU."""

import signal
import subprocess
import sys
import threading

import pytest
import torch

from invdiff_rt.parallel import map_ahead, map_batches


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


@pytest.mark.parametrize("mapper", [map_batches, lambda fn, items: list(map_ahead(fn, items))],
                         ids=["map_batches", "map_ahead"])
def test_exception_propagates_and_threads_restored(threads, mapper):
    threads(2)

    def fn(start: int) -> int:
        if start == 8:
            raise ValueError("bad batch 8")
        return start

    with pytest.raises(ValueError, match="bad batch 8"):
        mapper(fn, range(0, 16, 4))
    assert torch.get_num_threads() == 2


def test_single_thread_or_single_batch_runs_in_the_caller(threads):
    threads(1)
    caller = threading.get_ident()
    assert map_batches(lambda s: threading.get_ident() == caller, range(0, 9, 3)) == [True, True, True]
    threads(2)
    assert map_batches(lambda s: threading.get_ident() == caller, range(0, 3, 3)) == [True]
    assert map_batches(lambda s: threading.get_ident() == caller, range(0, 6, 3), device="meta") == [True, True]


def test_map_ahead_runs_ahead_in_workers_while_the_consumer_runs_on_one_thread(threads):
    threads(2)
    caller, second_started, overlapped, seen = threading.get_ident(), threading.Event(), [], []

    def fn(i: int) -> tuple[int, bool, int]:
        if i == 1:
            second_started.set()
        if i == 0:  # the second item starts while the first is still running
            overlapped.append(second_started.wait(timeout=30))
        return i * 10, threading.get_ident() == caller, torch.get_num_threads()

    for value, in_caller, inner in map_ahead(fn, range(7)):
        seen.append((value, in_caller, inner, torch.get_num_threads()))
    assert [v for v, *_ in seen] == list(range(0, 70, 10)) and overlapped == [True]  # in order, side by side
    assert {tuple(rest) for _, *rest in seen} == {(False, 1, 1)}  # in workers; workers and consumer on 1 thread
    assert torch.get_num_threads() == 2


def test_map_ahead_restores_threads_when_left_early_and_runs_in_the_caller_off_the_cpu(threads):
    threads(2)
    items = map_ahead(lambda i: i, range(2))
    assert next(items) == 0 and torch.get_num_threads() == 1  # the consumer runs on one thread meanwhile
    items.close()
    assert torch.get_num_threads() == 2
    caller = threading.get_ident()
    assert list(map_ahead(lambda i: threading.get_ident() == caller, range(3), device="meta")) == [True] * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_with_its_parent():
    """`die_with_parent` (the demo's export worker initializer) asks the kernel to kill the process with its parent:
    a `kill -9` of the demo left its spawned export worker orphaned, holding 0.7 GB."""
    code = ("import ctypes; from invdiff_rt.parallel import die_with_parent; die_with_parent(); "
            "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value)")  # PR_GET_PDEATHSIG
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == signal.SIGKILL
