"""How often does the weight rule's detector flag the adapter's *generated* minority samples? (issue 11, diagnosis)

The label-free weight rule (`invdiff_rt/method/calibrate.py`) matches the flag rate of the adapter's samples to a
target r* computed on training images. If the detector flags generated minority samples at another rate than
training ones, the rule over- or undershoots the balance. Per CFG scale and weight this prints the flag rate r(w)
(label-free, the calibration's own samples and seed) and, from the hidden attribute (diagnosis only, `invdiff eval`
on the same seed and count: the same even-indexed samples; the calibration's odd ones start from their neighbours'
negated noise), the minority share, so that r(w) / share is the detector's rate on generated minority samples
(nearly exact where the share is near 1). r(w) here is read against the training rows' cut (`calibrate.flag_rate`,
the rule's `centre="training"`), as the results were measured; the default rule centres the cut on the base
model's own samples (`calibrate.scale_weight`).

Usage: python bench/detector_rate.py --model M --data DIR --groups PREFIX --adapter DIR --attribute A
       [--guidance-scale 3.0 --guidance-scale 7.5] [--weights 3,4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    from invdiff_rt.eval.evaluate import evaluate
    from invdiff_rt.method import calibrate, splits
    from invdiff_rt.method.adapter import load_adapter, read_adapter_manifest
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.grouper import load_groups
    from invdiff_rt.models.loader import load_model

    ap = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--groups", "--adapter", "--attribute"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--guidance-scale", type=float, action="append")
    ap.add_argument("--weights", default="3,4")
    ap.add_argument("--json")
    args = ap.parse_args()
    config = calibrate.CalibrateConfig()
    model, groups = load_model(args.model), load_groups(args.groups)
    inputs, adapter = base_inputs(model, args.data), load_adapter(args.adapter, model)
    detector = calibrate.make_detector(model, inputs, groups.meta, config)
    trained = splits.as_trained(groups, read_adapter_manifest(args.adapter), inputs.prompt_ids)  # + a second split
    out = {"target_rate": calibrate.fit_reference(detector, inputs, trained.grouping, config), "rows": []}
    n = calibrate.samples_per_prompt(config, len(inputs.prompts))
    for scale in args.guidance_scale or [3.0]:
        for w in (float(x) for x in args.weights.split(",")):
            rate = calibrate.flag_rate(detector, model, adapter, inputs, config, scale, w)
            report = evaluate(model, args.data, args.attribute, per_prompt=n, seed=config.seed,
                              guidance_scale=scale, adapter=args.adapter, adapter_weight=w)
            share = 1 - report["majority_share"]
            row = {"guidance_scale": scale, "weight": w, "flag_rate": round(rate, 4),
                   "minority_share": round(share, 4), "rate_on_minority": round(rate / max(share, 1e-9), 4)}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"target_rate": round(out["target_rate"], 4)}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
