"""Why does the label-free grouper find one attribute and not the other? Per noise level t, the contrast score that
`invdiff groups` uses (loss(x_t | prompt) / loss(x_t | empty), one antithetic pair, same generators as the grouper)
on a fixed subset of train images: its per-prompt skewness (what picks the grouper's band) and its AUROC against
each hidden attribute's minority. Also scores two multi-band alternatives (max over levels of the per-prompt robust
z; the log contrast summed over the levels t >= 700), to size what a grouper change could gain. The stroke AUROC is
also given among colour-majority rows, apart for the prompts whose stroke minority is thin and those whose stroke
minority is thick (a score that tracked the stroke itself, not its rarity, would sit above 0.5 for one and below for
the other). `--score classifier` does all of it for the grouper's other score (loss with the prompt against every
prompt's loss, `losses.classifier_score`). Diagnostics only: the hidden columns are read for the AUROC.

Usage: python bench/two_attr_probe.py --model MODEL --data DIR [--n 1000] [--levels 300,500,...] [--pairs P]
       [--score contrast|classifier] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from invdiff_rt.data.folder import attribute_of, read_split
from invdiff_rt.method import grouper, losses
from invdiff_rt.method.cache import base_inputs
from invdiff_rt.models.loader import load_model

LEVELS = (100, 200, 300, 500, 700, 850, 925, 975)
ATTRIBUTES = ("color", "stroke")
MULTI_LEVEL_FROM = 700  # the multi-level alternative: the log contrast summed over the levels t >= this


def score_at(model, inputs, idx: torch.Tensor, t: int, seed: int, level: int, score: str = "contrast",
             pairs: int = 1) -> torch.Tensor:
    """`losses.mean_score` at fixed t on the subset `idx`, over `pairs` antithetic pairs (pair 0: the same noise as
    before): the mean contrast, or the classifier score of every prompt's mean loss."""
    x0 = inputs.latents[idx]
    ts = torch.full((x0.shape[0],), t, dtype=torch.long)
    subset = losses.ScoreInputs(x0, inputs.prompt_ids[idx], inputs.text_embeddings, inputs.uncond_embedding)
    noises = [torch.randn(x0.shape, generator=losses._gen(seed, 9, level, *([pair] if pair else [])))
              for pair in range(pairs)]
    draws = ((ts, eps) for noise in noises for eps in (noise, -noise))
    return losses.mean_score(model.unet, losses.make_noise_scheduler(model), subset, draws, score, 256).float()


def split_scores(z: torch.Tensor, minority: dict[str, torch.Tensor], k: float = 3.0) -> dict:
    inferred = z > k
    out = {}
    for a, m in minority.items():
        tp = int((inferred & m).sum())
        out[a] = {"auroc": round(grouper.auroc(z, m), 4), "precision": round(tp / max(int(inferred.sum()), 1), 4),
                  "recall": round(tp / max(int(m.sum()), 1), 4)}
    return out


def stroke_by_minority_value(z: torch.Tensor, minority: dict[str, torch.Tensor], strokes: list,
                             pids: torch.Tensor) -> dict:
    """Stroke AUROC among colour-majority rows, per value of the prompts' stroke minority (thin, thick)."""
    keep, out = ~minority["color"], {}
    for value in sorted({strokes[i] for i in minority["stroke"].nonzero().flatten().tolist()}):
        prompts = pids[minority["stroke"] & torch.tensor([s == value for s in strokes])].unique()
        rows = keep & torch.isin(pids, prompts)
        out[value] = round(grouper.auroc(z[rows], minority["stroke"][rows]), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--pairs", type=int, default=1, help="antithetic pairs averaged per level (the grouper: 1)")
    ap.add_argument("--score", choices=losses.SCORES, default="contrast", help="the grouper's --score")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = load_model(args.model)
    inputs = base_inputs(model, args.data)
    n = inputs.latents.shape[0]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:args.n].sort().values
    pids = inputs.prompt_ids[idx]
    minority = {a: grouper.hidden_minority(args.data, a, inputs.prompt_ids)[idx] for a in ATTRIBUTES}
    all_strokes = attribute_of(read_split(args.data, "train"), "stroke")
    strokes = [all_strokes[i] for i in idx.tolist()]
    rows, zs, high = [], [], torch.zeros(len(idx))
    for level, t in enumerate(int(x) for x in args.levels.split(",")):
        c = score_at(model, inputs, idx, t, args.seed, level, args.score, args.pairs)
        z = grouper.robust_prompt_z(c, pids)
        zs.append(z)
        high += c.clamp_min(1e-12).log() * (t >= MULTI_LEVEL_FROM)
        row = {"t": t, "skewness": round(losses.skewness(losses.per_prompt_ratio(c, pids).log()), 4),
               **{f"{a}_{k}": v for a, s in split_scores(z, minority).items() for k, v in s.items()},
               "stroke_auroc_colour_majority_by_minority": stroke_by_minority_value(z, minority, strokes, pids)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    zmax = torch.stack(zs).amax(0)
    zsum = grouper.robust_prompt_z(high.exp(), pids)
    summary = {"score": args.score, "pairs": args.pairs, "levels": rows,
               "max_z_over_levels": split_scores(zmax, minority),
               f"sum_log_{args.score}_from_{MULTI_LEVEL_FROM}": {
                   **split_scores(zsum, minority),
                   "stroke_auroc_colour_majority_by_minority": stroke_by_minority_value(zsum, minority, strokes, pids)},
               "n": len(idx),
               "minority_size": {a: int(m.sum()) for a, m in minority.items()},
               "overlap": int((minority["color"] & minority["stroke"]).sum())}
    print(json.dumps({k: v for k, v in summary.items() if k != "levels"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
