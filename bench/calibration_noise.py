"""How much does the label-free weight depend on the calibration seed? (issue 11, the weight rule's noise)

Runs the whole rule (`invdiff_rt/method/calibrate.py`: the reference, then r(w) on the adapter's own samples) once
per calibration seed and variant and prints each weight, then per variant the mean, sd and range over the seeds.
A variant is PAIRS:SAMPLES[:WIDTH[:SCORINGS[:CENTRE]]]: the detector's antithetic pairs per generated sample (a
sample's flag is the mean of its pairs'), whether the generated samples start in antithetic pairs (paired) or not
(independent), the flag's step width (0: the hard cut z > k), the inferred rows' scorings that set the reference's
pairs (0: PAIRS) and where the generated samples' cut is centred (base or training); WIDTH, SCORINGS and CENTRE
default to the rule's. `4:paired` is the default rule; `4:paired:0.5:240:training` the training-cut rule (sixteenth
session); `1:independent:0:0:training` the rule before 2026-12-05 (the same weights bit for bit).

Usage: python bench/calibration_noise.py --model M --data DIR --groups PREFIX --adapter DIR
       [--seeds 1000,2000,3000,4000,5000,6000] [--variants 1:independent:0:0:training,4:paired]
       [--guidance-scale 3.0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def variant_config(variant: str, seed: int, scale: float):
    from invdiff_rt.method.calibrate import CalibrateConfig

    pairs, samples, *rest = variant.split(":")
    if samples not in ("paired", "independent") or len(rest) > 3:
        raise SystemExit(f"--variants {variant}: write PAIRS:paired|independent[:WIDTH[:SCORINGS[:CENTRE]]]")
    width, scorings, centre = (rest + [None, None, None])[:3]
    default = CalibrateConfig()
    return CalibrateConfig(guidance_scales=(scale,), pairs=int(pairs), paired=samples == "paired", seed=seed,
                           flag_width=default.flag_width if width is None else float(width),
                           inferred_scorings=default.inferred_scorings if scorings is None else int(scorings),
                           centre=centre or default.centre)


def summary(rows: list[dict]) -> dict:
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        w = [r["weight"] for r in rows if r["variant"] == variant]
        out[variant] = {"weights": w, "mean": round(statistics.mean(w), 4), "range": [min(w), max(w)],
                        "sd": round(statistics.stdev(w), 4) if len(w) > 1 else None,
                        "seconds": round(statistics.mean(r["seconds"] for r in rows if r["variant"] == variant), 1)}
    return out


def main() -> None:
    from invdiff_rt.method import calibrate, splits
    from invdiff_rt.method.adapter import load_adapter, read_adapter_manifest
    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.method.grouper import load_groups
    from invdiff_rt.models.loader import load_model

    ap = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--groups", "--adapter"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--seeds", default="1000,2000,3000,4000,5000,6000")
    ap.add_argument("--variants", default="1:independent:0:0:training,4:paired")
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = load_model(args.model)
    inputs, adapter = base_inputs(model, args.data), load_adapter(args.adapter, model)
    groups = splits.as_trained(load_groups(args.groups), read_adapter_manifest(args.adapter), inputs.prompt_ids)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in args.variants.split(","):
            start = time.perf_counter()
            record = calibrate.calibrate(model, adapter, inputs, groups, variant_config(variant, seed,
                                                                                        args.guidance_scale))
            row = record["by_guidance_scale"][f"{args.guidance_scale:g}"]
            rows.append({"seed": seed, "variant": variant, "weight": row["weight"], "tried": row["tried"],
                         "target_rate": record["target_rate"], "reference_pairs": record["reference_pairs"],
                         "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"adapter": args.adapter, "guidance_scale": args.guidance_scale, "rows": rows, "summary": summary(rows)}
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
