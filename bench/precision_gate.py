"""The quality gate of a lossy CPU precision (issue 14): the same export evaluated by our OpenVINO backend at fp32
and at the candidate precision, same seed and prompts, N per prompt; passes when bias, bias_filtered and fidelity
are within 0.02 of fp32 and FID within 5 %. Also reports the images' mean absolute difference from fp32 (/255).

    python bench/precision_gate.py --export runs/demo/export/onnx --model colored-digits \
        --data runs/demo/data/dataset --adapter runs/demo/adapter/adapter --precision bf16 --per-prompt 128 \
        --json bench/results/precision-gate-bf16.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

BARS = {"bias": 0.02, "bias_filtered": 0.02, "fidelity": 0.02}
FID_BAR = 0.05


def evaluate_at(args, precision: str):
    from invdiff_rt.eval.evaluate import run_evaluation
    from invdiff_rt.method.calibrate import resolve_weight
    from invdiff_rt.runtime.backends.openvino_backend import OvRuntime

    weight, _ = resolve_weight(None, args.guidance_scale, export_dir=args.export)
    runtime = OvRuntime(args.export, precision=precision)
    return run_evaluation(args.model, args.data, args.attribute, per_prompt=args.per_prompt, seed=args.seed,
                          adapter=args.adapter, adapter_weight=weight, denoiser=runtime,
                          guidance_scale=args.guidance_scale, batch_size=64)


def gate(ref: dict, cand: dict) -> dict:
    """Per metric: fp32, candidate, difference, and whether it is within its bar."""
    rows = {k: {"fp32": ref[k], "candidate": cand[k], "diff": cand[k] - ref[k], "ok": abs(cand[k] - ref[k]) <= bar}
            for k, bar in BARS.items()}
    rel = cand["fid"] / ref["fid"] - 1
    rows["fid"] = {"fp32": ref["fid"], "candidate": cand["fid"], "diff": rel, "ok": abs(rel) <= FID_BAR}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--export", "--model", "--data", "--json"):
        p.add_argument(flag, required=True)
    p.add_argument("--adapter", default=None, help="the adapter folder of the export (fingerprinted only)")
    p.add_argument("--attribute", default="color")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--per-prompt", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    args = p.parse_args()
    ref, cand = evaluate_at(args, "fp32"), evaluate_at(args, args.precision)
    mad = float(np.abs(ref.images.astype(np.float64) - cand.images.astype(np.float64)).mean())
    rows = gate(ref.report, cand.report)
    shares = {name: [r["majority_share"] for r in run.report["per_prompt"].values()]
              for name, run in (("fp32", ref), ("candidate", cand))}
    result = {"precision": args.precision, "per_prompt": args.per_prompt, "seed": args.seed, "export": args.export,
              "mean_abs_diff_255": mad, "metrics": rows, "passed": all(r["ok"] for r in rows.values()),
              "per_prompt_majority_share": shares, "versions": ref.report["settings"]["versions"]}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    for name, r in rows.items():
        print(f"{name:14s} fp32 {r['fp32']:.4f}  {args.precision} {r['candidate']:.4f}  diff {r['diff']:+.4f}  "
              f"{'ok' if r['ok'] else 'FAIL'}")
    print(f"images: mean |diff| {mad:.3f}/255; gate {'passed' if result['passed'] else 'FAILED'} -> {args.json}")


if __name__ == "__main__":
    main()
