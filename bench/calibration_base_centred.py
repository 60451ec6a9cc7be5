"""A candidate weight rule, measured but not the default (issue 11): the generated samples' cut centred on the base
model's own samples.

The rule (`invdiff_rt/method/calibrate.py`) reads the adapter's samples against the per-prompt median / MAD of
re-scored *training* rows. The base model's own samples score lower than training images (on shapes-habitats its
minority at w = 0 is flagged at 0.05, training minority rows at 0.13-0.17), and the rule overshoots the balance
where the detector is weak. This variant samples once more per CFG scale at w = 0 (the calibration's own seed and
count), takes each pair's per-prompt median of those samples' log score (averaged over the pairs) as the centre of
the cut for every generated sample, and keeps the training rows' MAD and the target r* as they are. It prints the
calibration record (adapter.json is not touched); evaluate the printed weight with `invdiff eval --adapter-weight W`.
Results: `results/calibration_base_centred.json`, `results/debiasing.md` (*A cut centred on the base model's samples*).

Usage: python bench/calibration_base_centred.py --model M --data DIR --groups PREFIX --adapter DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import json


def centred_flag_rate(calibrate, base_median: dict):
    """`calibrate.flag_rate` with the detector's median swapped for the base samples' (computed once a CFG scale, by
    `Detector.fit` on a copy of the detector: each pair's per-prompt median, averaged)."""
    from dataclasses import replace

    import torch

    plain = calibrate.flag_rate

    def rate(detector, model, adapter, inputs, config, scale, weight):
        if scale not in base_median:
            n, n_prompts = calibrate.samples_per_prompt(config, len(inputs.prompts)), len(inputs.prompts)
            latents = calibrate.sample_latents(model, adapter, inputs.prompts, n, config.seed, config.steps, scale,
                                               0.0, config.batch_size, config.paired)
            pids = torch.arange(n_prompts).repeat_interleave(n)
            base = replace(detector)
            base.fit(detector.log_score(latents, pids, config.seed + 1, config.batch_size), pids, n_prompts)
            base_median[scale] = base.median
        trained, detector.median = detector.median, base_median[scale]
        try:
            return plain(detector, model, adapter, inputs, config, scale, weight)
        finally:
            detector.median = trained

    return rate


def main() -> None:
    from invdiff_rt.method import calibrate, splits
    from invdiff_rt.method.adapter import load_adapter, read_adapter_manifest
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.grouper import load_groups
    from invdiff_rt.models.loader import load_model

    ap = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--groups", "--adapter"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = load_model(args.model)
    inputs, adapter = base_inputs(model, args.data), load_adapter(args.adapter, model)
    groups = splits.as_trained(load_groups(args.groups), read_adapter_manifest(args.adapter), inputs.prompt_ids)
    calibrate.flag_rate = centred_flag_rate(calibrate, {})
    record = calibrate.calibrate(model, adapter, inputs, groups)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
