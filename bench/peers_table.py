"""Markdown table of an `invdiff bench --peers` JSON: per-image end-to-end ms (median over rounds, min-max),
images/s and the ratios to the best peer, as recorded in bench/README.md.

Usage: python bench/peers_table.py bench/results/cpu-peers.json
"""

from __future__ import annotations

import json
import sys


def spread(s: dict | None) -> str:
    return "-" if not s else f"**{s['median']:.2f}x** [{s['min']:.2f}-{s['max']:.2f}]"


def per_image(record: dict) -> str:
    b, rounds = record["batch_size"], record["e2e_ms_rounds"]
    return f"{record['e2e_ms_p50'] / b:.0f} [{min(rounds) / b:.0f}-{max(rounds) / b:.0f}]"


def rows(result: dict) -> list[str]:
    out = ["| contender | batch | ms / image (median [min-max] over rounds) | images/s | vs best peer, with adapter "
           "| vs best peer, no adapter | adapter overhead, step | adapter overhead, image |", "|---" * 8 + "|"]
    records = sorted(result["records"] + result["peers"], key=lambda r: (r["batch_size"], "peer" in r, r["backend"]))
    for r in records:
        name = r["backend"] if "peer" not in r else f"peer: {r['peer']} ({r['settings'].get('pipeline', '')})"
        out.append(f"| {name} | {r['batch_size']} | {per_image(r)} | {r['images_per_s']:.2f} | "
                   f"{spread(r.get('vs_best_peer'))} | {spread(r.get('base_vs_best_peer'))} | "
                   f"{spread(r.get('adapter_overhead_spread'))} | {spread(r.get('e2e_adapter_overhead'))} |")
    return out


def versions(result: dict) -> str:
    ours = {k: v for k, v in result["machine"].get("versions", {}).items()
            if k in ("torch", "onnxruntime", "openvino", "diffusers", "transformers")}
    peers = {p["peer"]: p["versions"] for p in result["peers"] if p["batch_size"] == result["config"]["batch_sizes"][0]}
    return f"ours: {ours}; peers: {peers}"


if __name__ == "__main__":
    data = json.load(open(sys.argv[1]))
    print("\n".join(rows(data)))
    print()
    print(versions(data))
