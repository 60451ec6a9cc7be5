"""How much of the ideal debiasing shift an adapter has learnt, per timestep (a diagnostic; uses a hidden column).

The ideal shift is `targets.Posterior.shift` with the oracle groups' JTT sampling weights: the difference, in eps
units, between the sampler-weighted and the plain empirical posterior mean of the prompt's training latents. For
each t it prints its rms and, per adapter, the rms of the adapter's delta, its projection on the ideal shift
(<delta, d*> / |d*|^2: 1 = all of it) and the mean cosine, on the same 128 noised training samples.

    python bench/adapter_shift.py --model colored-digits --data runs/data/colored-digits --attribute color ADAPTER...
    python bench/adapter_shift.py ... --attribute color,stroke ADAPTER...  # two columns' raked oracle groups
    python bench/adapter_shift.py ... --groups GROUPS --split-of A ADAPTER...  # label-free: the groups as adapter A
        # was trained on them (its refined second split)
"""

from __future__ import annotations

import argparse

import torch
from ideal_shift import grouping_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapters", nargs="*")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--attribute", required=True)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--groups", default=None, help="label-free groups instead of the oracle's (`ideal_shift.py`)")
    p.add_argument("--split-of", default=None, help="with --groups: the adapter whose second split to use")
    p.add_argument("--t", default="500,700,800,900,950,990", help="timesteps, comma-separated")
    p.add_argument("--temperature", type=float, default=1.0, help="the shift from posteriors at logits / T "
                   "(`ideal_shift.py --temperature`); 1: exact")
    a = p.parse_args()
    from invdiff_rt.method.adapter import load_adapter
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.losses import make_noise_scheduler
    from invdiff_rt.method.targets import Posterior
    from invdiff_rt.models.loader import load_model

    model = load_model(a.model)
    inputs = base_inputs(model, a.data)
    grouping = grouping_for(a.data, a.attribute, inputs, a.groups, a.split_of)
    sched = make_noise_scheduler(model)
    posterior = Posterior.build(inputs.latents, inputs.prompt_ids, grouping.sampling, temperature=a.temperature)
    adapters = {path: load_adapter(path, model) for path in a.adapters}
    g = torch.Generator().manual_seed(1)
    idx = torch.multinomial(grouping.sampling, a.n, replacement=True, generator=g)
    x0, noise = inputs.latents[idx], torch.randn(inputs.latents[idx].shape, generator=g)
    text, pids = inputs.text_embeddings[inputs.prompt_ids[idx]], inputs.prompt_ids[idx]
    with torch.no_grad():
        for t in map(int, a.t.split(",")):
            tt = torch.full((a.n,), t)
            x_t = sched.add_noise(x0, noise, tt)
            ideal = posterior.shift(x_t, tt, pids, sched.alphas_cumprod)
            eps = model.unet(x_t, tt.float(), encoder_hidden_states=text).sample
            row = [f"t={t} |d*|={ideal.pow(2).mean().sqrt():.4f}"]
            for path, adapter in adapters.items():
                delta = adapter(x_t, tt.float(), text, eps)
                proj = float((delta * ideal).sum() / ideal.pow(2).sum().clamp_min(1e-12))
                cos = torch.nn.functional.cosine_similarity(delta.flatten(1), ideal.flatten(1)).mean()
                row.append(f"{path}: |d|={delta.pow(2).mean().sqrt():.4f} proj={proj:.2f} cos={cos:.2f}")
            print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
