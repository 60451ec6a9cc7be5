"""Is a second split a second attribute? The first probe of the label-free test (classifier score, this script's
own second split); the test `invdiff train` runs is `invdiff_rt/method/splits.py` (`bench/split_test.py`).

A second split of the grouper's score (`two_attr_twosplit.py`) finds the second attribute's minority on
styled-digits, but on shapes-habitats it holds more of the first attribute's minority, which the raked sampler then
counts twice (the bias reverses). This probe asks the first split's trained adapter: the second split's rows stand
out in the classifier score (the excess: per prompt, the median of their log score above the median of the rows in
neither split); the adapter, trained to balance the first split's attribute, should remove the excess of rows that
carry that attribute and leave the excess of rows that carry another one. Printed per dataset: the excess of the
first split's rows and of the second's, under the base and under base + w * adapter (the same x_t: one antithetic
pair at t = LEVEL), and the fraction of each excess the adapter removed. The hidden columns are read only for the
diagnostic breakdown of the second split (rows that are a hidden column's minority, and the others).

Usage: python bench/two_attr_safety.py --model M --data DIR --groups FIRST_SPLIT_GROUPS --adapter ADAPTER
       [--level 975] [--k 1.5] [--weight W] [--report-attribute color,stroke,background] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from invdiff_rt import artifacts
from invdiff_rt.method import grouper, splits
from invdiff_rt.method.adapter import load_adapter, read_adapter_manifest
from invdiff_rt.method.cache import base_inputs
from invdiff_rt.method.calibrate import recorded_weight
from invdiff_rt.models.loader import load_model
from two_attr_probe import score_at
from two_attr_twosplit import present_minorities, second_split, summed_log_score


def excesses(log_score: torch.Tensor, sets: dict[str, torch.Tensor], rest, prompt_ids) -> dict[str, float]:
    """Per set of rows: the median of their log score above their prompt's median over `rest` (`splits.excess`)."""
    return {name: splits.excess(log_score, rows, rest, prompt_ids) for name, rows in sets.items()}


def hidden_sets(data: str, columns: str, second: torch.Tensor, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The second split's rows, broken down by each hidden column's minority (diagnostics only)."""
    sets = {}
    for column, m in present_minorities(data, columns, prompt_ids).items():
        sets[f"second & {column} minority"], sets[f"second & not {column} minority"] = second & m, second & ~m
    return sets


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--groups", "--adapter"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--level", type=int, default=975)
    ap.add_argument("--k", type=float, default=1.5)
    ap.add_argument("--weight", type=float, default=None, help="adapter weight (default: its recorded one)")
    ap.add_argument("--report-attribute", default="color,stroke,background")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = load_model(args.model)
    inputs = base_inputs(model, args.data)
    pids, first = inputs.prompt_ids, grouper.load_groups(args.groups).grouping.inferred
    second = second_split(summed_log_score(model, inputs, "classifier"), first, pids, args.k)
    weight = args.weight if args.weight is not None else recorded_weight(read_adapter_manifest(args.adapter), 3.0)[0]
    adapted = copy.copy(model)
    adapted.unet = splits.ShiftedUNet(model.unet, load_adapter(args.adapter, model), weight)
    idx, rest = torch.arange(len(pids)), ~(first | second)
    sets = {"first": first, "second": second, **hidden_sets(args.data, args.report_attribute, second, pids)}
    scores = {name: score_at(m, inputs, idx, args.level, 0, 0, "classifier").clamp_min(1e-12).log()
              for name, m in (("base", model), ("adapted", adapted))}
    result = {name: excesses(s, sets, rest, pids) for name, s in scores.items()}
    result["removed"] = {k: 1 - result["adapted"][k] / result["base"][k] for k in sets}
    result["config"] = {**vars(args), "weight": weight, "sizes": {k: int(v.sum()) for k, v in sets.items()}}
    print(json.dumps(result, indent=1))
    if args.json:
        artifacts.atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
