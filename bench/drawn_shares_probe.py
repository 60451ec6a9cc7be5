"""Can the groups' detector tell, without labels, how often the guided base draws each prompt's minority? (a probe
for a label-free `--oracle-shares-from`; reads the hidden column only to compare)

Per prompt: the detector's flag rate on the base's own samples (f0, the calibration's samples at w = 0 against the
training rows' cut), on the training rows the groups inferred as minority (rho) and on the other rows (phi); the
estimate q_hat = (f0 - phi) / (rho - phi), clipped to 0..1, against the drawn share measured by `invdiff eval`.

    python bench/drawn_shares_probe.py --model colored-digits --data DATA --groups GROUPS --base-report BASE.json
"""

from __future__ import annotations

import argparse
import json

import torch


def training_flags(detector, inputs, grouping, config):
    """(flags, prompt ids, inferred) of the calibration's reference rows, the detector fitted on them."""
    from invdiff_rt.method.calibrate import reference_flags

    flags, uniform, inferred = reference_flags(detector, inputs, grouping, config)
    rows = torch.cat([uniform, inferred])
    is_inferred = torch.cat([grouping.inferred[uniform], torch.ones(inferred.numel(), dtype=torch.bool)])
    return flags, inputs.prompt_ids[rows], is_inferred


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--data", "--groups", "--base-report"):
        p.add_argument(flag, required=True)
    p.add_argument("--per-prompt", type=int, default=128)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from invdiff_rt.method import calibrate as cal
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.grouper import load_groups
    from invdiff_rt.models.loader import load_model

    model = load_model(a.model)
    inputs, groups = base_inputs(model, a.data), load_groups(a.groups)
    config = cal.CalibrateConfig(per_prompt=a.per_prompt)
    detector = cal.make_detector(model, inputs, groups.meta, config)
    flags, pids, inferred = training_flags(detector, inputs, groups.grouping, config)
    base_scores, base_pids = cal.sample_scores(detector, model, None, inputs, config, 3.0, 0.0)
    base_flags = detector.flags(base_scores, base_pids)
    shares = json.load(open(a.base_report))["per_prompt"]
    rows = []
    for i, prompt in enumerate(inputs.prompts):
        rho, phi = flags[(pids == i) & inferred].mean().item(), flags[(pids == i) & ~inferred].mean().item()
        f0 = base_flags[base_pids == i].mean().item()
        rows.append({"prompt": prompt, "rho": rho, "phi": phi, "f0": f0,
                     "q_hat": min(max((f0 - phi) / max(rho - phi, 1e-6), 0.0), 1.0),
                     "q_drawn": 1 - shares[prompt]["majority_share"]})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}))
    pooled = {k: sum(r[k] for r in rows) / len(rows) for k in ("q_hat", "q_drawn")}
    print(json.dumps({"pooled": pooled}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"per_prompt": rows, "pooled": pooled}, f, indent=1)


if __name__ == "__main__":
    main()
