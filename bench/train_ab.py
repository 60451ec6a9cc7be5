"""Adapter training speed of two source trees, in interleaved rounds (one process tree, one at a time).

Each round trains the same adapter (`train.train_adapter`, every default, no calibration, no second-split test)
once with each tree's `invdiff_rt` on the import path, in a fresh Python process run from a neutral folder, and
records the seconds (the process's own clock around the call: inputs from the cache, `from_t`, the steps, the
save) and the adapter's hash. Make the other tree with `git worktree add /tmp/old REV`.

Usage: python bench/train_ab.py --trees /tmp/old,. --model colored-digits --data DIR --groups GROUPS
       [--steps 2000] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from invdiff_rt import artifacts  # the parent only writes the result; each run imports its own tree's package

RUN = """
import hashlib, sys, time
import invdiff_rt
from invdiff_rt.method import train
from invdiff_rt.method.grouper import load_groups
from invdiff_rt.models.loader import load_model
model, groups = load_model(sys.argv[1]), load_groups(sys.argv[3])
start = time.perf_counter()
out = train.train_adapter(model, sys.argv[2], groups, sys.argv[4], train.TrainConfig(
    steps=int(sys.argv[5]), calibrate=False, second_split=False, show_progress=False))
seconds = time.perf_counter() - start
print(invdiff_rt.__file__, seconds, hashlib.sha256((out / "adapter.safetensors").read_bytes()).hexdigest())
"""


def one_run(tree: Path, args, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", RUN, args.model, str(Path(args.data).resolve()), str(Path(args.groups).resolve()),
           str(out), str(args.steps)]
    package, seconds, sha = subprocess.run(cmd, cwd="/", env=env, capture_output=True, text=True,
                                           check=True).stdout.split()[-3:]
    assert Path(package).resolve().is_relative_to(tree), (package, tree)  # the tree's code ran
    return {"tree": str(tree), "seconds": round(float(seconds), 2), "adapter_sha256": sha[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--trees", "--model", "--data", "--groups"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="/tmp/train_ab", help="scratch folder for the adapters")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    rows = []
    for r in range(args.rounds):
        for i, tree in enumerate(trees):
            rows.append({"round": r, **one_run(tree, args, Path(args.out) / f"tree{i}")})
            print(json.dumps(rows[-1]), flush=True)
    medians = {str(t): statistics.median(x["seconds"] for x in rows if x["tree"] == str(t)) for t in trees}
    print(json.dumps({"median_seconds": medians}))
    if args.json:
        record = {"config": vars(args), "machine": f"{platform.node()} {os.cpu_count()} cores", "rows": rows,
                  "median_seconds": medians}
        artifacts.atomic_write_json(args.json, record)


if __name__ == "__main__":
    main()
