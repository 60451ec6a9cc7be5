"""Can the reader of `invdiff train --shares-from samples` clean the groups' candidate second split? (a probe; reads
the hidden column only to report precision and recall)

The candidate (`invdiff_rt/method/splits.py`) mixes a second attribute's minority with rows atypical in other ways.
Label-free refinement, in rounds: drop from the candidate the rows the first split's reader (`drawn.cross_fit`)
flags, train the reader on what is left (two folds, each row read by the fold model that did not see it), and keep
per prompt the rows it ranks highest, as many as the cleaned candidate had; repeat on that split. The refined split
is written as a groups artifact (the groups with their candidate replaced). Since 2026-12-07 `invdiff train` does
one such round itself on a candidate its test keeps (`splits.refine`), so `invdiff train --groups OUT` refines the
written split once more; the results recorded before that (`bench/results/refined_split.json`) trained on it as
written. `--rounds 1` writes the split the default fine-tunes on.

    python bench/refined_split.py --model styled-digits --data DATA --groups GROUPS --out REFINED --attribute stroke
        [--rounds 4]
"""

from __future__ import annotations

import argparse
import json

import torch


def score(flags, truth, prompt_ids, prompts: int) -> dict:
    """Precision and recall against the hidden minority, overall and per prompt (true / flagged / minority rows)."""
    def cell(rows):
        return [int((flags & truth & rows).sum()), int((flags & rows).sum()), int((truth & rows).sum())]
    tp, n, m = cell(torch.ones_like(flags))
    return {"precision": round(tp / max(n, 1), 3), "recall": round(tp / m, 3),
            "per_prompt": [cell(prompt_ids == p) for p in range(prompts)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--data", "--groups", "--out", "--attribute"):
        p.add_argument(flag, required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from invdiff_rt.method import drawn, splits
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.grouper import hidden_minority, load_groups, save_groups
    from invdiff_rt.models.loader import load_model

    inputs, result = base_inputs(load_model(a.model), a.data), load_groups(a.groups)
    prompts, prompt_ids = inputs.prompts, inputs.prompt_ids
    truth = hidden_minority(a.data, a.attribute, prompt_ids)
    x, first = drawn.reader_images(a.data), result.grouping.inferred
    steps = splits.refinement(x, prompt_ids, first, result.grouping.candidate, len(prompts), a.seed)
    flags = next(steps)
    rounds = {"candidate": score(result.grouping.candidate, truth, prompt_ids, len(prompts)),
              "cleaned": score(flags, truth, prompt_ids, len(prompts))}
    for r, flags in zip(range(a.rounds), steps):
        rounds[f"round {r}"] = score(flags, truth, prompt_ids, len(prompts))
        print(f"round {r}: precision {rounds[f'round {r}']['precision']}, recall {rounds[f'round {r}']['recall']}")
    result.grouping.candidate = flags
    save_groups(result, a.out)
    report = {"settings": vars(a), "prompts": prompts, "rounds": rounds}
    print(json.dumps(report if a.json is None else {"written": a.json}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
