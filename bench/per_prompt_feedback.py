"""Does per-prompt feedback on what an adapter draws bring every prompt into range? (a probe on two-split groups;
`--source oracle` reads the hidden columns; not a pipeline feature)

One weight serves every prompt, and under it the prompts respond differently (styled-digits with the defaults before
the second split was refined: the colour of 7 and 9 overshoots to 0.23-0.29, the stroke of 5 and 9 stays at 0.94).
The probe reads an adapter's own
samples per prompt (N a prompt at its recorded weight, seed 3000: not the evaluation's), sets each prompt's share
of each split in the fine-tune's raked sampler to

    fraction = sigmoid(gamma * (logit(target) - logit(read)))        clamped to 0.2..0.8

(0.5 for every prompt is the default sampler; the splits are disjoint, so where a prompt's two fractions sum past 1
the candidate's holds and the first split gets the rest: `effective_fractions` in the JSON) and trains a new adapter with every default but those fractions, which
act in the fine-tune on both splits and in its calibration (`grouper._balance` is patched in this process only).
- `--source oracle`: read = each prompt's minority share by `invdiff eval`'s classifiers on the hidden columns
  (first split: --attributes' first, candidate: its second), target = 0.5;
- `--source readers`: read = the share of the samples flagged by the `--shares-from samples` reader of each split
  (`drawn.cross_fit` on the training rows), target = the share of the training rows that reader flags, weighted as
  the default raked sampler weighs them (what it would read if the adapter drew the sampler exactly);
- `--only-first`: the candidate keeps 0.5 everywhere.

    python bench/per_prompt_feedback.py --model styled-digits --data DATA --groups GROUPS --adapter A --out NEW \
        --seed 1 --source oracle|readers [--only-first] [--attributes color,stroke] [--json FRACTIONS.json]
Then `invdiff eval --adapter NEW ...` for each attribute.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

SEED = 3000  # the feedback samples' seed
CLAMP = (0.2, 0.8)


def logit(v: float) -> float:
    v = min(max(v, 0.01), 0.99)
    return math.log(v / (1 - v))


def fraction(target: float, read: float, gamma: float) -> float:
    f = 1 / (1 + math.exp(-gamma * (logit(target) - logit(read))))
    return min(max(f, CLAMP[0]), CLAMP[1])


def oracle_reads(model, data, adapter, weight: float, attributes: list[str], per_prompt: int) -> list[list[float]]:
    """Per split, each prompt's minority share by the evaluation classifier of its attribute."""
    from invdiff_rt.eval.evaluate import run_evaluation

    reports = [run_evaluation(model, data, a, per_prompt=per_prompt, seed=SEED, adapter=adapter,
                              adapter_weight=weight).report for a in attributes]
    return [[1 - r["per_prompt"][p]["majority_share"] for p in r["per_prompt"]] for r in reports]


def reader_reads(model, data, adapter, weight: float, inputs, flags, per_prompt: int) -> tuple[list, list]:
    """Per split, (targets, reads): the readers' flag share on the training rows under the raked sampler, and on the
    adapter's samples (`drawn.drawn_majority`'s reading, kept half a sample from 0 and 1)."""
    from invdiff_rt.eval.evaluate import generate_images
    from invdiff_rt.method import drawn
    from invdiff_rt.method.adapter import load_adapter
    from invdiff_rt.method.grouper import raked_sampling_weights

    pid, prompts = inputs.prompt_ids, len(inputs.prompts)
    x, sampling = drawn.reader_images(data), raked_sampling_weights(flags, pid)
    images = generate_images(model, inputs.prompts, per_prompt, SEED, adapter=load_adapter(adapter, model),
                             adapter_weight=weight)
    targets, reads = [], []
    for col in range(flags.shape[1]):
        nets, held = drawn.cross_fit(x, pid, flags[:, col], prompts, 100 * col)
        targets.append([float((sampling[pid == p] * held[pid == p]).sum() / sampling[pid == p].sum())
                        for p in range(prompts)])
        reads.append([1 - q for q in drawn.drawn_majority(nets, images, prompts, per_prompt, x.shape[-1])])
    return targets, reads


def patch_balance(flags: torch.Tensor, table: list[list[float]]) -> None:
    """`grouper._balance` with a per-prompt fraction for each split's column of `flags` (others unchanged)."""
    from invdiff_rt.method import grouper

    original = grouper._balance

    def balance(s, minority, prompt_ids, default):
        col = next((c for c in range(flags.shape[1]) if torch.equal(minority.bool(), flags[:, c])), None)
        if col is None:
            return original(s, minority, prompt_ids, default)
        for p in prompt_ids.unique():  # one prompt at a time: the others masked out (id -1, no minority rows)
            mine = prompt_ids == p
            original(s, minority & mine, torch.where(mine, prompt_ids, -1), table[col][int(p)])
    grouper._balance = balance


def effective(flags: torch.Tensor, prompt_ids: torch.Tensor) -> list[list[float]]:
    """Each split's share of each prompt's mass in the (patched) raked sampler. The splits are disjoint, so where
    two asked fractions sum past 1 the second one holds and the first gets what is left."""
    from invdiff_rt.method.grouper import raked_sampling_weights

    s = raked_sampling_weights(flags, prompt_ids)
    return [[round(float(s[(prompt_ids == p) & flags[:, c]].sum() / s[prompt_ids == p].sum()), 3)
             for p in range(int(prompt_ids.max()) + 1)] for c in range(flags.shape[1])]


def _second(data, inputs, grouping) -> torch.Tensor:
    """The second split the fine-tune balances: the refined candidate (`splits.refine`, since 2026-12-07; the runs
    recorded before that used the candidate as the groups hold it)."""
    from invdiff_rt.method import splits
    from invdiff_rt.method.drawn import reader_images

    return splits.refine(reader_images(data), inputs.prompt_ids, grouping.inferred.bool(), grouping.candidate.bool(),
                         len(inputs.prompts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--data", "--groups", "--adapter", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=("oracle", "readers"), required=True)
    p.add_argument("--attributes", default="color,stroke")
    p.add_argument("--only-first", action="store_true")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--per-prompt", type=int, default=128)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.calibrate import resolve_weight
    from invdiff_rt.method.grouper import load_groups
    from invdiff_rt.method.train import TrainConfig, train_adapter
    from invdiff_rt.models.loader import load_model

    model, groups = load_model(a.model), load_groups(a.groups)
    inputs = base_inputs(model, a.data)
    flags = torch.stack([groups.grouping.inferred, _second(a.data, inputs, groups.grouping)], 1).bool()
    weight = resolve_weight(None, 3.0, adapter_dir=a.adapter)[0]
    if a.source == "oracle":
        reads = oracle_reads(model, a.data, a.adapter, weight, a.attributes.split(","), a.per_prompt)
        targets = [[0.5] * len(inputs.prompts)] * 2
    else:
        targets, reads = reader_reads(model, a.data, a.adapter, weight, inputs, flags, a.per_prompt)
    table = [[fraction(t, r, a.gamma) for t, r in zip(ts, rs)] for ts, rs in zip(targets, reads)]
    if a.only_first:
        table[1] = [0.5] * len(inputs.prompts)
    patch_balance(flags, table)
    record = {"settings": vars(a), "weight_read_at": weight, "targets": targets, "reads": reads, "fractions": table,
              "effective_fractions": effective(flags, inputs.prompt_ids)}
    print(json.dumps({k: record[k] for k in ("reads", "fractions", "effective_fractions")}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
    train_adapter(model, a.data, groups, a.out, TrainConfig(seed=a.seed))


if __name__ == "__main__":
    main()
