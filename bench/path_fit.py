"""How much of its target an adapter reproduces where it acts: along its own sampling path (a diagnostic).

`adapter_shift.py` measures the fit on noised training rows; here the states are the sampler's (`invdiff eval`'s
samples: DDIM 25, CFG 3.0, the adapter at its recorded weight, seed 0). At each step where the adapter acts, per
prompt: the projection <delta, d*> / |d*|^2 of the adapter's shift on the target shift (`ideal_shift.IdealShift`:
the groups with the adapter's second split, at `--temperature`), for each CFG branch and after the combine
(s d_cond - (s - 1) d_uncond, what moves the sample), and the combined target's norm. 1: all of it.

    python bench/path_fit.py --model styled-digits --data DATA --groups GROUPS --adapter A --temperature 2
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from ideal_shift import IdealShift, adapter_target

BRANCHES = ("combined", "cond", "uncond")


class PathProbe(torch.nn.Module):
    """The adapter, called as the fused step calls it ([cond; uncond] rows), recording its fit to `target` per
    (prompt, t): sums of <delta, d*> and |d*|^2 for each of `BRANCHES`."""

    def __init__(self, adapter, target: IdealShift, guidance_scale: float):
        super().__init__()
        self.adapter, self.target, self.scale, self.from_t = adapter, target, guidance_scale, adapter.from_t
        self.sums = collections.defaultdict(lambda: torch.zeros(len(BRANCHES), 2, dtype=torch.float64))

    def forward(self, sample, timestep, encoder_hidden_states, eps_base):
        delta = self.adapter(sample, timestep, encoder_hidden_states, eps_base)
        ideal = self.target(sample, timestep, encoder_hidden_states, eps_base)
        b, t = sample.shape[0] // 2, int(timestep.reshape(-1)[0].round())
        pairs = [(self.scale * d[:b] - (self.scale - 1) * d[b:], self.scale * i[:b] - (self.scale - 1) * i[b:])
                 for d, i in [(delta, ideal)]] + [(delta[:b], ideal[:b]), (delta[b:], ideal[b:])]
        prompts = self.target.prompt_of(encoder_hidden_states[:b])
        for p in prompts.unique().tolist():
            rows = prompts == p
            self.sums[(p, t)] += torch.tensor([[float((d[rows] * i[rows]).sum()), float(i[rows].pow(2).sum())]
                                               for d, i in pairs], dtype=torch.float64)
        return delta

    def table(self, prompts: int) -> dict:
        """{branch: {t: [projection per prompt]}} and the combined target's norm per prompt and t."""
        ts = sorted({t for _, t in self.sums}, reverse=True)
        fit = {name: {str(t): [round(float(self.sums[(p, t)][k, 0] / self.sums[(p, t)][k, 1]), 3)
                               for p in range(prompts)] for t in ts} for k, name in enumerate(BRANCHES)}
        norm = {str(t): [round(float(self.sums[(p, t)][0, 1]) ** 0.5, 2) for p in range(prompts)] for t in ts}
        return {"projection": fit, "combined_target_norm": norm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--groups", required=True, help="the groups the adapter was trained on")
    p.add_argument("--adapter", required=True)
    p.add_argument("--attributes", default="color,stroke", help="the hidden columns the report reads")
    p.add_argument("--temperature", type=float, default=1.0, help="the target's (targets.Posterior)")
    p.add_argument("--weight", type=float, default=None, help="default: the adapter's recorded weight")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--per-prompt", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from invdiff_rt.eval.evaluate import evaluate
    from invdiff_rt.method.adapter import load_adapter, read_adapter_manifest
    from invdiff_rt.method.calibrate import recorded_weight
    from invdiff_rt.models.loader import load_model

    model = load_model(a.model)
    target = adapter_target(model, a.data, a.attributes, a.groups, a.adapter, 0, a.temperature)
    probe = PathProbe(load_adapter(a.adapter, model), target, a.guidance_scale)
    weight = a.weight if a.weight is not None else recorded_weight(read_adapter_manifest(a.adapter),
                                                                   a.guidance_scale)[0]
    report = evaluate(model, a.data, a.attributes.split(",")[-1], per_prompt=a.per_prompt, adapter=probe,
                      adapter_weight=weight, guidance_scale=a.guidance_scale)
    out = {"weight": weight, "temperature": a.temperature, **probe.table(len(report["per_prompt"])),
           "majority_share": [round(v["majority_share"], 3) for v in report["per_prompt"].values()]}
    for branch, rows in out["projection"].items():
        print(branch)
        for t, row in rows.items():
            print(f"  t={t:>4}", " ".join(f"{v:.2f}" for v in row))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
