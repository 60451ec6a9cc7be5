"""Summary of bench/two_attr.sh: per attribute, base vs debiased bias / bias_filtered / fidelity / FID, the
per-prompt majority shares, the group diagnostics, and the issue-11 acceptance checks. Prints a table and writes
OUT/summary.json.

Usage: python bench/two_attr_summary.py OUT ATTRIBUTE [ATTRIBUTE ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADLINE = ("bias", "bias_filtered", "fidelity", "fid")
SHARE_RANGE = (0.30, 0.80)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def shares(report: dict) -> dict[str, float]:
    return {p.rsplit(" ", 1)[-1]: row["majority_share"] for p, row in report["per_prompt"].items()}


def checks(base: dict, deb: dict) -> dict[str, bool]:
    lo, hi = SHARE_RANGE
    return {
        "bias_filtered_cut_50pct": deb["bias_filtered"] <= 0.5 * base["bias_filtered"],
        "majority_shares_in_range": all(lo <= s <= hi for s in shares(deb).values()),
        "fidelity_ge_0.9x": deb["fidelity"] >= 0.9 * base["fidelity"],
        "fid_le_1.5x": deb["fid"] <= 1.5 * base["fid"],
    }


def attribute_summary(out: Path, attribute: str) -> dict:
    base, deb = read(out / f"eval-base-{attribute}.json"), read(out / f"eval-debiased-{attribute}.json")
    groups = read(out / f"groups-{attribute}.json").get("diagnostics", {})
    return {
        "base": {k: base[k] for k in HEADLINE}, "debiased": {k: deb[k] for k in HEADLINE},
        "adapter_weight": deb.get("settings", {}).get("adapter_weight"),
        "bias_filtered_cut": round(1 - deb["bias_filtered"] / base["bias_filtered"], 4),
        "majority_share_base": shares(base), "majority_share_debiased": shares(deb),
        "groups": {k: groups.get(k) for k in ("auroc", "precision", "recall", "inferred_size", "minority_size",
                                               "minority_effective_weight")},
        "checks": checks(base, deb),
    }


def fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def print_summary(summary: dict) -> None:
    for attribute, s in summary.items():
        print(f"\n[{attribute}]  adapter weight {fmt(s['adapter_weight'])}")
        print(f"  {'metric':<16}{'base':>9}{'debiased':>10}")
        for k in HEADLINE:
            print(f"  {k:<16}{fmt(s['base'][k]):>9}{fmt(s['debiased'][k]):>10}")
        print(f"  bias_filtered cut {100 * s['bias_filtered_cut']:.1f} %")
        for label, key in (("base", "majority_share_base"), ("debiased", "majority_share_debiased")):
            print(f"  majority share per digit ({label}): "
                  + " ".join(f"{d}:{v:.2f}" for d, v in sorted(s[key].items())))
        g = s["groups"]
        print(f"  groups vs hidden {attribute}: AUROC {fmt(g['auroc'])}, precision {fmt(g['precision'])}, "
              f"recall {fmt(g['recall'])} (inferred {g['inferred_size']}, true minority {g['minority_size']}, "
              f"minority effective weight {fmt(g['minority_effective_weight'])})")
        print("  acceptance: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in s["checks"].items()))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    summary = {a: attribute_summary(out, a) for a in argv[1:]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
