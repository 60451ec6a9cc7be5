"""The second-split test (`invdiff_rt/method/splits.py`) of a trained adapter, at several weights.

`invdiff train` runs `splits.attribute_test` once, at `splits.TEST_WEIGHT`, on the adapter it just trained on the
first split. This script runs the same test on any adapter and groups file with a candidate (`invdiff groups`), at
the weights given, and prints one JSON record per weight (the excess log contrast of each split under the base and
the adapted model, the shares removed, their ratio and the verdict at `splits.TEST_THRESHOLD`). Label-free.

Usage: python bench/split_test.py --model M --data DIR --groups GROUPS --adapter ADAPTER [--weights 1.0,1.35]
       [--json OUT]
"""

from __future__ import annotations

import argparse
import json

from invdiff_rt import artifacts
from invdiff_rt.method import grouper, splits
from invdiff_rt.method.adapter import load_adapter
from invdiff_rt.method.cache import base_inputs
from invdiff_rt.method.losses import make_noise_scheduler
from invdiff_rt.models.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--data", "--groups", "--adapter"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--weights", default=f"1.0,{splits.TEST_WEIGHT}")
    ap.add_argument("--seed", type=int, default=0, help="the training seed (the test's noise seed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = load_model(args.model)
    inputs, g = base_inputs(model, args.data), grouper.load_groups(args.groups).grouping
    if not splits.has_candidate(g):
        raise SystemExit(f"--groups {args.groups}: no candidate second split; rerun `invdiff groups`")
    adapter, scheduler = load_adapter(args.adapter, model), make_noise_scheduler(model)
    records = []
    for w in (float(x) for x in args.weights.split(",")):
        result = splits.attribute_test(model.unet, adapter, scheduler, inputs, g.inferred, g.candidate, w, args.seed,
                                       splits.SCORE_BATCH)
        records.append(result.record())
        print(json.dumps(records[-1]), flush=True)
    if args.json:
        artifacts.atomic_write_json(args.json, {"config": vars(args), "records": records})


if __name__ == "__main__":
    main()
