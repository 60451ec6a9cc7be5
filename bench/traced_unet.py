"""The frozen UNet on CPU, eager against traced (`runtime/traced.py`), in interleaved rounds in one process.

Each round times both forms at each batch size, one after the other, on one thread. It times them alone and then
two side by side, the way `map_ahead` and `map_batches` run them. It also checks that the traced output equals
the eager output bit for bit. The trace is made outside the timing; its one-off cost is recorded separately.

Usage: python bench/traced_unet.py [--model styled-digits] [--batches 8,32,64,256] [--rounds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import torch

from invdiff_rt import artifacts
from invdiff_rt.models.loader import load_model
from invdiff_rt.runtime.traced import _Eps, _trace


def inputs(unet, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(batch)
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return (torch.randn(shape, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g))


def ms_per_call(fn, args, calls: int, side_by_side: bool) -> float:
    def work():
        with torch.inference_mode():
            for _ in range(calls):
                fn(*args)

    threads = [threading.Thread(target=work) for _ in range(2 if side_by_side else 1)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - start) / (calls * len(threads)) * 1000


def one_batch(eps, batch: int, rounds: int) -> dict:
    args = inputs(eps.unet, batch)
    with torch.inference_mode():
        start = time.perf_counter()
        traced = _trace(eps, args)
        trace_s = time.perf_counter() - start
        identical = torch.equal(traced(*args), eps(*args))
    forms, calls = {"eager": eps, "traced": traced}, max(3, 1024 // batch)
    times = {f"{f} {m}": [] for f in forms for m in ("alone", "side by side")}
    for _ in range(rounds):
        for form, fn in forms.items():
            for mode in ("alone", "side by side"):
                times[f"{form} {mode}"].append(round(ms_per_call(fn, args, calls, mode != "alone"), 2))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {m: round(med[f"traced {m}"] / med[f"eager {m}"], 3) for m in ("alone", "side by side")}
    return {"batch": batch, "trace_seconds": round(trace_s, 2), "bit_identical": identical, "ms_per_call": times,
            "median_ms": med, "traced_over_eager": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="styled-digits")
    ap.add_argument("--batches", default="8,32,64,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    eps = _Eps(load_model(args.model).unet).eval()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows.append(one_batch(eps, batch, args.rounds))
        print(json.dumps({k: rows[-1][k] for k in ("batch", "trace_seconds", "bit_identical", "median_ms",
                                                     "traced_over_eager")}), flush=True)
    if args.json:
        artifacts.atomic_write_json(args.json, {"config": vars(args), "torch": torch.__version__, "rows": rows,
                                                "machine": f"{platform.node()} {os.cpu_count()} cores"})


if __name__ == "__main__":
    main()
