"""What a perfectly learnt adapter would give: sampling with the ideal shift itself in place of the adapter (a
diagnostic; uses a hidden column for the groups and the metrics).

The "adapter" here is `targets.Posterior.shift` computed on the fly, per row and CFG branch, from the training
latents and a grouping's sampling weights: the difference, in eps units, between the sampler-weighted and the plain
empirical posterior mean (the conditional branch over its prompt's latents, the unconditional one over all). It is
what the `rb` target trains the adapter towards (up to the base's own error). Sampling and metrics are `invdiff
eval`'s (DDIM 25, CFG 3.0 unless given), so the rows compare with the README's debiasing table.

    python bench/ideal_shift.py --model colored-digits --data DATA --attribute color --from-t 800 --weight 1
    python bench/ideal_shift.py ... --oracle-shares-from BASE_REPORT  # the shift from what the guided base draws
    python bench/ideal_shift.py --attribute color,stroke ...  # two columns' oracle groups, the raked sampler
    python bench/ideal_shift.py --attribute color,stroke --groups GROUPS --adapter A ...  # label-free: the groups
        # as adapter A was trained on them (its refined second split); the columns only score

With several columns every one is scored on the same samples (one `invdiff eval` report per column).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


class IdealShift(torch.nn.Module):
    """`GuidanceAdapter`'s call signature; delta = Posterior.shift of each row's prompt (-1: the empty prompt)."""

    def __init__(self, inputs, sampling: torch.Tensor, alphas_cumprod: torch.Tensor, from_t: int,
                 prior: torch.Tensor | None = None, temperature: float = 1.0):
        from invdiff_rt.method.targets import Posterior

        super().__init__()
        self.alphas_cumprod, self.from_t = alphas_cumprod, from_t
        self.posterior = Posterior.build(inputs.latents, inputs.prompt_ids, sampling, prior, temperature)
        self.table = torch.cat([inputs.text_embeddings, inputs.uncond_embedding.reshape(1, *inputs.text_embeddings.shape[1:])]).flatten(1)

    def prompt_of(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Row -> prompt id by nearest embedding (the last table row, the empty prompt, -> -1)."""
        ids = torch.cdist(encoder_hidden_states.flatten(1).float(), self.table).argmin(1)
        return torch.where(ids == len(self.table) - 1, -1, ids)

    def forward(self, sample, timestep, encoder_hidden_states, eps_base):
        t = timestep.reshape(-1).round().long().clamp(0, len(self.alphas_cumprod) - 1)
        return self.posterior.shift(sample.float(), t, self.prompt_of(encoder_hidden_states),
                                    self.alphas_cumprod).to(sample.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--attribute", required=True)
    p.add_argument("--from-t", type=int, default=800)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--per-prompt", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--groups", default=None, help="label-free groups (an `invdiff groups` prefix) instead of the "
                   "oracle's; with --adapter, as that adapter was trained on them (splits.as_trained)")
    p.add_argument("--adapter", default=None, help="with --groups: an adapter directory whose adapter.json says "
                   "which second split it was fine-tuned on")
    p.add_argument("--oracle-shares-from", default=None, help="an `invdiff eval --json` report of the base: shift "
                   "from the shares the guided base draws, not the data's (`invdiff train --oracle-shares-from`)")
    p.add_argument("--temperature", type=float, default=1.0, help="the shift from posteriors at logits / T "
                   "(targets.Posterior; the second split's fine-tune: splits.FINETUNE_TEMPERATURE); 1: exact")
    a = p.parse_args()
    if a.groups and a.oracle_shares_from:
        p.error("--oracle-shares-from: the oracle groups' prior; drop --groups or drop it")
    from invdiff_rt.eval.evaluate import evaluate
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.losses import make_noise_scheduler
    from invdiff_rt.models.loader import load_model

    model = load_model(a.model)
    inputs = base_inputs(model, a.data)
    grouping = grouping_for(a.data, a.attribute, inputs, a.groups, a.adapter)
    prior = None
    if a.oracle_shares_from:
        from invdiff_rt.method.train import TrainConfig, oracle_prior

        config = TrainConfig(oracle_column=a.attribute, oracle_shares=(a.oracle_shares_from,))
        prior = oracle_prior(model, inputs, grouping, config)[0]
    ideal = IdealShift(inputs, grouping.sampling, make_noise_scheduler(model).alphas_cumprod, a.from_t, prior,
                       a.temperature)
    reports = {column: evaluate(model, a.data, column, per_prompt=a.per_prompt, adapter=ideal,
                                adapter_weight=a.weight, guidance_scale=a.guidance_scale)
               for column in a.attribute.split(",")}
    keys = ("bias", "bias_filtered", "majority_share", "fidelity", "fid")
    for column, report in reports.items():
        shares = [round(v["majority_share"], 3) for v in report["per_prompt"].values()]
        print(json.dumps({"attribute": column, "from_t": a.from_t, "weight": a.weight, "temperature": a.temperature,
                          **{k: report[k] for k in keys}, "per_prompt_share": shares}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports if len(reports) > 1 else reports[a.attribute], f, indent=1)


def grouping_for(data: str, attribute: str, inputs, groups: str | None = None, adapter: str | None = None):
    """The oracle groups of `attribute` (one column, or several with the raked sampler), or the label-free `groups`
    as `adapter` was trained on them (`splits.as_trained`)."""
    from invdiff_rt.method.grouper import group_from_flags, hidden_minority, load_groups

    if groups is None:
        if adapter:
            print(f"{adapter}: an adapter's second split needs the groups it was trained on; add --groups",
                  file=sys.stderr)
            raise SystemExit(2)
        return group_from_flags(hidden_minority(data, attribute, inputs.prompt_ids), inputs.prompt_ids, "invdiff-rt")
    from invdiff_rt.method.adapter import read_adapter_manifest
    from invdiff_rt.method.splits import as_trained

    result = load_groups(groups)
    if adapter:
        result = as_trained(result, read_adapter_manifest(adapter), inputs.prompt_ids)
    return result.grouping


def adapter_target(model, data: str, attributes: str, groups: str, adapter: str, from_t: int,
                   temperature: float) -> IdealShift:
    """The shift `adapter` was trained towards: the label-free `groups` as it was trained on them (its second split,
    `grouping_for`), at `temperature`, acting from `from_t`."""
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.losses import make_noise_scheduler

    inputs = base_inputs(model, data)
    grouping = grouping_for(data, attributes, inputs, groups, adapter)
    return IdealShift(inputs, grouping.sampling, make_noise_scheduler(model).alphas_cumprod, from_t, None, temperature)


if __name__ == "__main__":
    main()
