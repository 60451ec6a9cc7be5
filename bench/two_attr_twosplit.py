"""A label-free second split for styled-digits' second attribute (a probe of a grouper design, not the default).

First split: the groups of `invdiff groups` (its score at its band, robust z > 3). Second split, per prompt among
the rows outside the first: robust z > K of a score summed over fixed levels, one antithetic pair each (the probe's
generators): `--score contrast` (default) the log contrast over t = 700-975 (it ranks both stroke minorities alike,
`two_attr_probe.py`); `--score classifier` the log classifier score (`losses.classifier_score`, every prompt's loss)
over t = 850, 925 (among the colour majority it ranks the thick stroke minorities at AUROC 0.82-0.84 at these
levels, the contrast at 0.72-0.79: `results/two_attr_probe_classifier.json`, `two_attr_probe_halves.json`). The
two flags go to the raked sampler (each split's rows half of every prompt's mass) and are written as a groups file
for `invdiff train --groups OUT`. Label-free; the hidden columns are read only for the printed diagnostics. The
weight rule of `invdiff train` reads the first split's detector, with its target rate weighed by this sampler.

Usage: python bench/two_attr_twosplit.py --model styled-digits --data DIR --groups GROUPS --out OUT [--k 1.5]
       [--score contrast|classifier] [--pairs P] [--report-attribute color,stroke,background]
"""

from __future__ import annotations

import argparse

import torch

from invdiff_rt.errors import InvdiffError
from invdiff_rt.method import grouper, splits
from invdiff_rt.method.cache import base_inputs
from invdiff_rt.models.loader import load_model
from two_attr_probe import score_at

LEVELS = {"contrast": (700, 800, 850, 925, 975), "classifier": (850, 925)}


def summed_log_score(model, inputs, score: str, pairs: int = 1) -> torch.Tensor:
    idx = torch.arange(inputs.latents.shape[0])
    return sum(score_at(model, inputs, idx, t, 0, level, score, pairs).clamp_min(1e-12).log()
               for level, t in enumerate(LEVELS[score]))


def second_split(score: torch.Tensor, first: torch.Tensor, prompt_ids: torch.Tensor, k: float) -> torch.Tensor:
    """Per prompt, among the rows outside `first`: robust z of `score` above k (`splits.candidate_split`)."""
    return splits.candidate_split(score, first, prompt_ids, k)


def present_minorities(data: str, columns: str, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-prompt minority flags of each of the comma-separated hidden columns the dataset has (diagnostics only)."""
    flags = {}
    for column in columns.split(","):
        try:
            flags[column] = grouper.hidden_minority(data, column, prompt_ids)
        except InvdiffError:  # a dataset without this column (colored-digits has no stroke)
            continue
    return flags


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--groups", "--out"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--k", type=float, default=1.5)
    ap.add_argument("--score", choices=tuple(LEVELS), default="contrast")
    ap.add_argument("--pairs", type=int, default=1, help="antithetic pairs per level of the second split's score")
    ap.add_argument("--report-attribute", default="color,stroke,background",
                    help="hidden columns to print diagnostics for (those the dataset lacks are skipped)")
    args = ap.parse_args()
    model = load_model(args.model)
    inputs = base_inputs(model, args.data)
    result = grouper.load_groups(args.groups)
    first, pids = result.grouping.inferred, inputs.prompt_ids
    second = second_split(summed_log_score(model, inputs, args.score, args.pairs), first, pids, args.k)
    split = grouper.group_from_flags(torch.stack([first, second], 1), pids, "invdiff-rt")
    split.score = result.grouping.score
    first_info = {k: v for k, v in result.grouping.info.items() if k != "candidate"}  # this file has no candidate
    split.info = {**first_info, "second_split": {"score": f"sum log {args.score} {LEVELS[args.score]}",
                                                 "k": args.k, "pairs": args.pairs}}
    result.grouping = split
    result.meta = {**result.meta, "inferred_size": int(split.inferred.sum()), "grouping": split.info}
    grouper.save_groups(result, args.out)
    for column, m in present_minorities(args.data, args.report_attribute, pids).items():
        print(f"{column}: second split holds {int((second & m).sum())} of {int(m.sum())} minority rows "
              f"({int(second.sum())} flagged); minority sampling share {float(split.sampling[m].sum() / len(m)):.3f}")


if __name__ == "__main__":
    main()
