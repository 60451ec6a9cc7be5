"""How many draws the candidate second split needs: its antithetic pair per level against one draw per level.

The candidate (`splits.candidate_score`) is three quarters of `invdiff groups`' UNet calls: one antithetic pair of
the log contrast at each of `splits.CANDIDATE_LEVELS`. This probe draws each level's pair as `invdiff groups` does
(`splits.level_draws`: the same noise, so the "pairs" design reproduces the groups' candidate bit for bit, checked),
keeps the two halves apart, and compares candidate designs made from them: the pair, one draw per level (the pair's
+noise half, or its -noise half: two independent one-draw candidates), and pairs at two of the four levels. Each
design is cut as the groups cut it (`splits.candidate_split`, among the rows outside the first split) and reported
with its size, how many rows of the hidden minority of ATTRIBUTE it flags (overall and per prompt), its AUROC
against that minority among the rows outside the first split, and its overlap with the pair design (Jaccard).
The hidden column is read only here, for the diagnostics.

Usage: python bench/candidate_draws.py --model M --data DIR --groups GROUPS --attribute A [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from invdiff_rt import artifacts
from invdiff_rt.method import grouper, losses, splits
from invdiff_rt.method.cache import base_inputs
from invdiff_rt.models.loader import load_model

from candidate_levels import band_log_score  # bench/: the first split's band score, drawn as the groups drew it


def level_halves(model, inputs, seed: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per candidate level t: the contrast of the pair's +noise and -noise draws, float64 [N] each."""
    scheduler, halves = losses.make_noise_scheduler(model), {}
    with torch.no_grad():
        for level, t in enumerate(splits.CANDIDATE_LEVELS):
            draws = splits.level_draws(inputs.latents.shape, t, seed, level)
            halves[t] = tuple(losses.mean_score(model.unet, scheduler, inputs, [d], "contrast", splits.SCORE_BATCH)
                              for d in draws)
    return halves


def designs(band: torch.Tensor, halves: dict) -> dict[str, torch.Tensor]:
    """Candidate scores (the log band score plus a sum of per-level log contrasts), by design name."""
    log = lambda x: x.clamp_min(1e-12).log()  # noqa: E731
    pair = {t: log((plus + minus) / 2) for t, (plus, minus) in halves.items()}
    lo, hi = splits.CANDIDATE_LEVELS[::2], splits.CANDIDATE_LEVELS[1::2]
    return {"pairs (current)": band + sum(pair.values()),
            "one draw (+noise)": band + sum(log(p) for p, _ in halves.values()),
            "one draw (-noise)": band + sum(log(m) for _, m in halves.values()),
            f"pairs at {lo}": band + sum(pair[t] for t in lo),
            f"pairs at {hi}": band + sum(pair[t] for t in hi)}


def report(score: torch.Tensor, first: torch.Tensor, minority: torch.Tensor, pids: torch.Tensor,
           reference: torch.Tensor) -> dict:
    cut, rest = splits.candidate_split(score, first, pids), ~first
    both, either = (cut & reference).sum(), (cut | reference).sum()
    return {"size": int(cut.sum()), "minority": int((cut & minority).sum()),
            "minority_per_prompt": [int((cut & minority & (pids == p)).sum()) for p in pids.unique()],
            "auroc": round(grouper.auroc(score[rest].float(), minority[rest]), 3),
            "jaccard_with_pairs": round(float(both / either), 3) if either else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--data", "--groups", "--attribute"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = load_model(args.model)
    inputs, result = base_inputs(model, args.data), grouper.load_groups(args.groups)
    g, pids = result.grouping, inputs.prompt_ids
    minority = grouper.hidden_minority(args.data, args.attribute, pids)
    seed = result.meta["seed"]
    scores = designs(band_log_score(model, inputs, result.meta["profile"], seed), level_halves(model, inputs, seed))
    reference = splits.candidate_split(scores["pairs (current)"], g.inferred, pids)
    assert torch.equal(reference, g.candidate), "the pair design does not reproduce the groups' candidate"
    out = {"minority_outside_first": int((minority & ~g.inferred).sum()), "designs": {}}
    for name, score in scores.items():
        out["designs"][name] = report(score, g.inferred, minority, pids, reference)
        print(name, json.dumps(out["designs"][name]), flush=True)
    if args.json:
        artifacts.atomic_write_json(args.json, {"config": vars(args), **out})


if __name__ == "__main__":
    main()
