"""Where a sampler puts each attribute's minority: per prompt, the 2x2 cells of two hidden attributes (a diagnostic
for two-attribute data; the evaluation classifiers read the hidden columns).

The images are `invdiff eval`'s (N a prompt, sampling seed 0, DDIM 25, CFG 3.0 unless given), drawn once and read by
both attributes' classifiers. Each cell counts the samples in the training majority or minority of each attribute;
P(B min | A maj) and P(B min | A min) say whether the second attribute's minority is drawn in both cells of the
first one, as a sampler of independent attributes would draw it.

    python bench/joint_cells.py --model styled-digits --data DATA --adapter A  # at A's recorded weight
    python bench/joint_cells.py ... --adapter A --target --temperature 2 --from-t 650  # the shift A was trained
        # towards (`ideal_shift.py`: its groups with A's second split), sampled in place of the adapter at w = 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from ideal_shift import adapter_target


def sampler(model, a):
    """(the adapter or the target shift, its weight)."""
    from invdiff_rt.method.adapter import read_adapter_manifest
    from invdiff_rt.method.calibrate import recorded_weight

    if not a.target:
        return a.adapter, a.weight if a.weight is not None else recorded_weight(read_adapter_manifest(a.adapter),
                                                                               a.guidance_scale)[0]
    shift = adapter_target(model, a.data, ",".join(a.attributes), a.groups, a.adapter, a.from_t, a.temperature)
    return shift, 1.0 if a.weight is None else a.weight


def minority_flags(data: Path, attribute: str, run) -> np.ndarray:
    """bool [P*N]: each image read in its prompt's training minority of `attribute`."""
    from invdiff_rt.data.folder import read_split
    from invdiff_rt.eval.classifiers import load_classifier_pair
    from invdiff_rt.eval.evaluate import resolve_classifier_dir, train_majorities

    clf = load_classifier_pair(resolve_classifier_dir(data, None, attribute), attribute)[0]
    majority = train_majorities(read_split(data, "train"), attribute, run.prompts)
    n = len(run.images) // len(run.prompts)
    return np.array([clf.labels[i] != majority[run.prompts[k // n]] for k, i in enumerate(clf.predict(run.images))])


def cells(first: np.ndarray, second: np.ndarray) -> dict:
    """The 2x2 counts of one prompt's samples and the second attribute's minority rate in each first-attribute cell."""
    counts = {f"{a}_{b}": int((fa & fb).sum()) for a, fa in (("maj", ~first), ("min", first))
              for b, fb in (("maj", ~second), ("min", second))}
    rates = {f"p_second_min_given_first_{a}": round(float(second[fa].mean()), 3) if fa.any() else None
             for a, fa in (("maj", ~first), ("min", first))}
    return {**counts, **rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--attributes", default="color,stroke", help="two hidden columns: first,second")
    p.add_argument("--weight", type=float, default=None,
                   help="default: the adapter's recorded weight (1 with --target)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--per-prompt", type=int, default=128)
    p.add_argument("--target", action="store_true", help="sample with the adapter's target shift instead")
    p.add_argument("--groups", default=None, help="with --target: the groups the adapter was trained on")
    p.add_argument("--temperature", type=float, default=1.0, help="with --target: targets.Posterior's temperature")
    p.add_argument("--from-t", type=int, default=650, help="with --target: where the shift acts")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    a.attributes = a.attributes.split(",")
    if a.target and not a.groups:
        p.error("--target: add --groups (the groups the adapter was trained on)")
    from invdiff_rt.eval.evaluate import run_evaluation
    from invdiff_rt.models.loader import load_model

    model = load_model(a.model)
    shift, weight = sampler(model, a)
    run = run_evaluation(model, a.data, a.attributes[0], per_prompt=a.per_prompt, adapter=shift,
                         adapter_weight=weight, guidance_scale=a.guidance_scale)
    first, second = (minority_flags(Path(a.data), column, run) for column in a.attributes)
    n = a.per_prompt
    report = {"attributes": a.attributes, "weight": weight, "target": a.target, "temperature": a.temperature,
              "per_prompt": {prompt: cells(first[k * n:(k + 1) * n], second[k * n:(k + 1) * n])
                             for k, prompt in enumerate(run.prompts)}}
    for prompt, row in report["per_prompt"].items():
        print(prompt, json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
