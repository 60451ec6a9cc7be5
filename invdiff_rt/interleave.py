"""Interleaved rounds over persistent worker processes: how `invdiff bench` times contenders on a noisy machine.

Every contender (one of our backends, or a peer pipeline) lives in its own long-lived process, loaded once. The
driver then asks them for one measurement each, round by round (A, B, C, A, B, C, ...; the order rotates every
round), so a busy neighbour slows every contender alike, and a ratio is taken within each round and reported as
the median over rounds with its spread.

Protocol: JSON lines. The worker answers each request on a private duplicate of its stdout; anything the libraries
print goes to stderr (the worker's log). The first line a worker sends is its hello ({"skip": reason} when it cannot
run). Requests: {"op": "measure", "batch": B} -> a dict of lists of milliseconds; {"op": "quit"}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InvdiffError


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of per-round values (numpy's linear interpolation)."""
    if len(values) == 0:
        raise ValueError("spread of an empty list")
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "q1": float(np.percentile(v, 25)), "q3": float(np.percentile(v, 75)), "n": int(v.size)}


def round_ratios(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """spread() of numerators[r] / denominators[r] over rounds r."""
    if len(numerators) != len(denominators):
        raise ValueError("ratio of per-round lists of different lengths")
    return spread([n / d for n, d in zip(numerators, denominators)])


def rotation(names: list[str], round_index: int) -> list[str]:
    """The contenders' order in a round: rotated by one every round, so none is always first or last."""
    k = round_index % len(names) if names else 0
    return names[k:] + names[:k]


# --- worker side ------------------------------------------------------------------------------------------------------


def serve(hello: Callable[[], dict], handle: Callable[[dict], dict]) -> int:
    """Worker loop: send hello(), then answer requests from stdin until {"op": "quit"} or EOF."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library prints go to the log, not the channel

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        info = hello()
    except InvdiffError as e:
        info = {"error": str(e)}
    send(info)
    if "skip" in info or "error" in info:
        return 0
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        send(handle(request))
    return 0


# --- driver side ------------------------------------------------------------------------------------------------------


class ProcessWorker:
    """A contender in its own process (`argv`), its stderr in `log_path`; `fix`: what to do if it dies."""

    def __init__(self, name: str, argv: list[str], log_path: Path, fix: str = ""):
        self.name, self.log_path, self.fix = name, Path(log_path), fix
        self._log = open(self.log_path, "w")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                         text=True)
        except OSError as e:  # not there, not executable
            self._log.close()
            raise InvdiffError(f"--backends/--peers {name}: cannot start {argv[0]} ({e.strerror}){fix}") from e
        self.hello: dict | None = None

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise InvdiffError(f"--backends/--peers {self.name}: its worker died ({self._last_log_line()}){self.fix}")
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # another program than the worker (e.g. --peers-python not a Python)
            raise InvdiffError(f"--backends/--peers {self.name}: its worker answered {line.strip()[:40]!r}, not the "
                               f"benchmark's JSON{self.fix}") from None

    def start(self) -> dict:
        """Wait for the hello (the worker has loaded its pipeline)."""
        self.hello = self.receive()
        if "error" in self.hello:
            raise InvdiffError(f"--backends/--peers {self.name}: its benchmark failed ({self.hello['error']})")
        return self.hello

    def request(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()

    def _last_log_line(self) -> str:
        lines = [s for s in self.log_path.read_text(errors="replace").splitlines() if s.strip()]
        return lines[-1].removeprefix("error: ") if lines else f"exit code {self.proc.returncode}"


class LocalWorker:
    """The same contract in this process (tests, `isolate=False`)."""

    def __init__(self, name: str, hello: Callable[[], dict], handle: Callable[[dict], dict]):
        self.name, self._hello, self._handle = name, hello, handle
        self.hello: dict | None = None

    def start(self) -> dict:
        self.hello = self._hello()
        return self.hello

    def request(self, message: dict) -> dict:
        return self._handle(message)

    def close(self) -> None:
        pass


def run_rounds(workers: dict, batches: list[int], rounds: int,
               log: Callable[[str], None] = lambda s: None) -> dict[str, dict[int, list[dict]]]:
    """{name: {batch: [one measurement per round]}}: round by round, batch by batch, contenders rotated."""
    results: dict[str, dict[int, list[dict]]] = {name: {b: [] for b in batches} for name in workers}
    for r in range(rounds):
        for batch in batches:
            for name in rotation(list(workers), r):
                results[name][batch].append(workers[name].request({"op": "measure", "batch": batch}))
        log(f"round {r + 1}/{rounds} done")
    return results
