"""Can a small image classifier trained on the groups' own split read, without labels, how often the guided base
draws each prompt's minority? (a probe for a label-free `--oracle-shares-from`, after `drawn_shares_probe.py` found
the diffusion detector too blunt; reads the hidden column only to compare)

The reader is `invdiff train --shares-from samples`' (`invdiff_rt/method/drawn.py`): a small CNN with one (prompt,
flag) class per cell, trained on the training images with the groups' flags as labels, in two folds. Per prompt
the probe reports the reader's flag rate on held-out training rows (f_t), its rates on the inferred rows (tpr) and
on the others (fpr), its flag rate on the base's own samples (f_s, both folds' models, clamped to 0.5/n..1 - 0.5/n
as training clamps it) and a corrected estimate (f_s - fpr) / (tpr - fpr), clipped to 0..1, against the drawn
minority share the evaluation classifier reads on the same samples (`invdiff eval`'s, hidden column).

    python bench/drawn_shares_reader.py --model colored-digits --data DATA --groups GROUPS --attribute color
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _correlation(a: list, b: list) -> float | None:
    """Pearson's r, or None (JSON null) where it is undefined: fewer than 3 prompts or a constant column."""
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--data", "--groups", "--attribute"):
        p.add_argument(flag, required=True)
    p.add_argument("--split", choices=("first", "candidate"), default="first",
                   help="the groups' first split (inferred) or their candidate second split")
    p.add_argument("--per-prompt", type=int, default=128)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from invdiff_rt.eval.evaluate import run_evaluation
    from invdiff_rt.method import drawn
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.grouper import hidden_minority, load_groups
    from invdiff_rt.models.loader import load_model

    start = time.perf_counter()
    model = load_model(a.model)
    inputs, groups = base_inputs(model, a.data), load_groups(a.groups)
    flags = groups.grouping.inferred if a.split == "first" else groups.grouping.candidate
    x, pids, n_prompts = drawn.reader_images(a.data), inputs.prompt_ids, len(inputs.prompts)
    nets, flagged = drawn.cross_fit(x, pids, flags, n_prompts, seed=0)
    trained = time.perf_counter() - start
    run = run_evaluation(model, a.data, a.attribute, per_prompt=a.per_prompt, seed=0,
                         guidance_scale=a.guidance_scale)
    drawn_majority = drawn.drawn_majority(nets, run.images, n_prompts, a.per_prompt, x.shape[-1])
    truth = hidden_minority(a.data, a.attribute, pids)
    rows = []
    for i, prompt in enumerate(inputs.prompts):
        mine = pids == i
        tpr, fpr = flagged[mine & flags].float().mean().item(), flagged[mine & ~flags].float().mean().item()
        f_s = 1 - drawn_majority[i]
        rows.append({"prompt": prompt, "data_minority": truth[mine].float().mean().item(),
                     "inferred": flags[mine].float().mean().item(), "f_t": flagged[mine].float().mean().item(),
                     "tpr": tpr, "fpr": fpr, "true_tpr": flagged[mine & truth].float().mean().item(),
                     "true_fpr": flagged[mine & ~truth].float().mean().item(), "f_s": f_s,
                     "q_hat": min(max((f_s - fpr) / max(tpr - fpr, 1e-6), 0.0), 1.0),
                     "q_drawn": 1 - run.report["per_prompt"][prompt]["majority_share"]})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}))
    keys = ("data_minority", "f_t", "f_s", "q_hat", "q_drawn")
    pooled = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    corr = {k: _correlation([r[k] for r in rows], [r["q_drawn"] for r in rows]) for k in ("f_s", "q_hat")}
    summary = {"pooled": pooled, "per_prompt_correlation_with_q_drawn": corr, "reader_seconds": round(trained, 1),
               "settings": vars(a)}
    print(json.dumps(summary))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"per_prompt": rows, **summary}, f, indent=1)


if __name__ == "__main__":
    main()
