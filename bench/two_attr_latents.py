"""Where do styled-digits' two attributes live in the training latents? A model-free diagnostic for the grouper.

Per prompt: the first two principal directions of the prompt's latents (around their median) and how well |score| on
each separates each hidden attribute's minority (AUROC), plus the distance to the prompt's median latent (over all
samples, and over the colour majority only). If colour and stroke minorities lie along the same direction, one
scalar outlier score (the grouper's) ranks both together, and the more frequent or the more extreme one fills the
inferred minority. With --groups (an `invdiff groups` output on DIR): among each prompt's rows outside the inferred
minority, the AUROC against the stroke minority of the groups' score and of its least-squares fit on the rows' first
two principal coordinates (the score read along the latent directions; below 0.5: the score is higher for the
stroke majority). Diagnostics only: the hidden columns are read for the AUROC.

Usage: python bench/two_attr_latents.py --model styled-digits --data DIR [--groups PREFIX] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from invdiff_rt.method import grouper
from invdiff_rt.method.cache import base_inputs
from invdiff_rt.models.loader import load_model

ATTRIBUTES = ("color", "stroke")


def principal_directions(x: torch.Tensor, q: int) -> torch.Tensor:
    """The first q right singular vectors of x [n, d] as columns [d, q] (exact SVD: reproducible)."""
    return torch.linalg.svd(x, full_matrices=False).Vh[:q].T


def prompt_rows(flat: torch.Tensor, minority: dict[str, torch.Tensor]) -> dict:
    """AUROC of |PC1|, |PC2| and the distance to the median, per attribute, within one prompt's rows."""
    x = flat - flat.median(0).values
    v = principal_directions(x, 2)
    scores = {"pc1": (x @ v[:, 0]).abs(), "pc2": (x @ v[:, 1]).abs(), "median_distance": x.norm(dim=1)}
    return {name: {a: round(grouper.auroc(s, m), 3) for a, m in minority.items()} for name, s in scores.items()}


def score_along_latents(flat: torch.Tensor, score: torch.Tensor, stroke: torch.Tensor) -> dict:
    """AUROC vs stroke of the score and of its fit on the rows' first two principal coordinates (one prompt)."""
    x = flat - flat.mean(0)
    v = principal_directions(x, 2)
    design = torch.cat([x @ v, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    fit = design @ torch.linalg.lstsq(design, score[:, None]).solution
    return {"score": round(grouper.auroc(score, stroke), 3),
            "score_fit_2pc": round(grouper.auroc(fit[:, 0], stroke), 3)}


def groups_rows(args, inputs, flat: torch.Tensor, stroke: torch.Tensor) -> dict:
    g = grouper.load_groups(args.groups).grouping
    pids, score = inputs.prompt_ids, g.score.double()
    rest = [(pids == p) & ~g.inferred for p in range(len(inputs.prompts))]
    return {inputs.prompts[p]: score_along_latents(flat[r], score[r], stroke[r]) for p, r in enumerate(rest)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--groups", help="an `invdiff groups` output on --data: the score along the latent directions")
    ap.add_argument("--json")
    args = ap.parse_args()
    inputs = base_inputs(load_model(args.model), args.data)
    pids, flat = inputs.prompt_ids, inputs.latents.flatten(1).double()
    minority = {a: grouper.hidden_minority(args.data, a, pids) for a in ATTRIBUTES}
    per_prompt = {inputs.prompts[p]: prompt_rows(flat[pids == p], {a: m[pids == p] for a, m in minority.items()})
                  for p in range(len(inputs.prompts))}
    medians = torch.stack([flat[pids == p].median(0).values for p in range(len(inputs.prompts))])
    dist = (flat - medians[pids]).norm(dim=1)
    keep = ~minority["color"]
    summary = {"median_distance": {a: round(grouper.auroc(dist, m), 3) for a, m in minority.items()},
               "median_distance_stroke_within_colour_majority": round(grouper.auroc(dist[keep],
                                                                                    minority["stroke"][keep]), 3),
               "per_prompt": per_prompt}
    if args.groups:
        summary["stroke_within_inferred_majority"] = groups_rows(args, inputs, flat, minority["stroke"])
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
