"""Where in t each minority shows: per level, the candidate's log contrast ranked against a hidden attribute.

For each level t, one antithetic pair of the log contrast (the draws `invdiff groups` uses for the candidate second
split: `splits.log_score_at`, noise keyed by the level's index in `splits.CANDIDATE_LEVELS`, or by 100 + t for other
levels), plus the first split's band score; then, among the rows outside the first split of GROUPS, the AUROC of
each score (and of the candidate's sum of them) against the hidden minority of ATTRIBUTE, per prompt and overall,
and how many of that minority the candidate's cut (robust z > `splits.CANDIDATE_K`) of each score flags. The hidden
column is read only here, for the diagnostics. On styled-digits' stroke this showed the two minorities of one
attribute at different t (the thin-stroke minority at t >= 900, the thick one at t = 700-850):
bench/results/debiasing.md, *A cheaper candidate*.

Usage: python bench/candidate_levels.py --model M --data DIR --groups GROUPS --attribute stroke
       [--levels 600,700,...,999] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from invdiff_rt import artifacts
from invdiff_rt.method import grouper, losses, splits
from invdiff_rt.method.cache import base_inputs
from invdiff_rt.models.loader import load_model

LEVELS = "600,700,750,800,850,900,925,950,975,999"


def band_log_score(model, inputs, profile: dict, seed: int) -> torch.Tensor:
    """float64 [N]: the log of the first split's band score, drawn as the groups drew it (`profile` is the groups
    manifest's)."""
    config = losses.ProfileConfig(draws=profile["draws"], antithetic=profile["antithetic"])
    with torch.no_grad():
        return losses.band_score(model.unet, losses.make_noise_scheduler(model), inputs, tuple(profile["band"]),
                                 config, seed, splits.SCORE_BATCH).clamp_min(1e-12).log()


def level_scores(model, inputs, profile: dict, levels: list[int], seed: int) -> dict[str, torch.Tensor]:
    """float64 [N] per level ("t700", ...) and "band" (`band_log_score`)."""
    scheduler = losses.make_noise_scheduler(model)
    keys = {t: splits.CANDIDATE_LEVELS.index(t) if t in splits.CANDIDATE_LEVELS else 100 + t for t in levels}
    with torch.no_grad():
        scores = {f"t{t}": splits.log_score_at(model.unet, scheduler, inputs, t, seed, keys[t], "contrast",
                                                splits.SCORE_BATCH) for t in levels}
    return {**scores, "band": band_log_score(model, inputs, profile, seed)}


def ranking(score: torch.Tensor, minority: torch.Tensor, rest: torch.Tensor, prompt_ids: torch.Tensor,
            candidate: torch.Tensor) -> dict:
    """AUROC among the `rest` rows (overall and per prompt) and the minority rows the cut flags."""
    per_prompt = {int(p): round(grouper.auroc(score[rest & (prompt_ids == p)].float(),
                                              minority[rest & (prompt_ids == p)]), 3)
                  for p in prompt_ids.unique()}
    return {"auroc": round(grouper.auroc(score[rest].float(), minority[rest]), 3), "per_prompt": per_prompt,
            "flagged": int(candidate.sum()), "flagged_minority": int((candidate & minority).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--data", "--groups", "--attribute"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--levels", default=LEVELS)
    ap.add_argument("--seed", type=int, default=None, help="noise seed (default: the groups' seed, as the candidate)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = load_model(args.model)
    inputs, result = base_inputs(model, args.data), grouper.load_groups(args.groups)
    first, pids = result.grouping.inferred, inputs.prompt_ids
    minority = grouper.hidden_minority(args.data, args.attribute, pids)
    seed = result.meta["seed"] if args.seed is None else args.seed
    scores = level_scores(model, inputs, result.meta["profile"], [int(t) for t in args.levels.split(",")], seed)
    if all(f"t{t}" in scores for t in splits.CANDIDATE_LEVELS):  # the candidate's own score
        scores["candidate"] = scores["band"] + sum(scores[f"t{t}"] for t in splits.CANDIDATE_LEVELS)
    report = {"minority_outside_first": int((minority & ~first).sum()), "levels": {}}
    for name, score in scores.items():
        report["levels"][name] = ranking(score, minority, ~first, pids, splits.candidate_split(score, first, pids))
        print(name, json.dumps(report["levels"][name]), flush=True)
    if args.json:
        artifacts.atomic_write_json(args.json, {"config": vars(args), **report})


if __name__ == "__main__":
    main()
