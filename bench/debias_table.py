"""The debiasing table of the README: base, ERM adapter, paper recipe, default recipe (3 seeds), default with
lambda 1 (ablation), oracle groups (3 seeds), and guidance-weight sweeps, all with the same sampling seeds.

Runs the CLI in subprocesses, `--jobs` at a time with one torch thread each (on a 2-core CPU two single-thread jobs
are ~3x faster than one two-thread job), and writes OUT/table.json + OUT/table.md. Every step is skipped when its
output already exists, so the script can be stopped and rerun.

    python bench/debias_table.py --model colored-digits --data runs/data/colored-digits --attribute color \
        --out runs/table --per-prompt 128 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLI = [sys.executable, "-m", "invdiff_rt.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SWEEP = (0.5, 1.0, 1.5, 2.0)


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(CLI + cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def groups_step(a, name: str, extra: list[str]) -> Path:
    prefix = a.out / "groups" / name
    if not prefix.with_suffix(".json").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        run(["groups", "--model", a.model, "--data", str(a.data), "--out", str(prefix), "--threads", "1",
             "--report-attribute", a.attribute, *extra], a.out / "logs" / f"groups-{name}.log")
    return prefix


def train_step(a, name: str, extra: list[str]) -> Path:
    out = a.out / "adapters" / name
    while Path(f"{out}.ckpt").exists() and time.time() - Path(f"{out}.ckpt").stat().st_mtime < 600:
        time.sleep(10)  # another run of this script is training it
    if not (out / "adapter.json").exists():
        steps = [] if a.steps is None else ["--steps", str(a.steps)]
        run(["train", "--model", a.model, "--data", str(a.data), "--out", str(out), "--threads", "1", *steps,
             *extra], a.out / "logs" / f"train-{name}.log")
    return out


def eval_step(a, name: str, adapter: Path | None, weight: float | None, n: int) -> dict:
    """weight None with an adapter: the weight recorded with it (label-free calibration or the recipe's default)."""
    tag = name if adapter is None else f"{name}@{'rec' if weight is None else f'{weight:g}'}"
    out = a.out / "evals" / f"{tag}.json"
    if not out.exists():
        cmd = ["eval", "--model", a.model, "--data", str(a.data), "--attribute", a.attribute, "--per-prompt",
               str(n), "--seed", "0", "--json", str(out)]
        if a.guidance_scale is not None:
            cmd += ["--guidance-scale", str(a.guidance_scale)]
        if adapter is not None:
            cmd += ["--adapter", str(adapter)] + ([] if weight is None else ["--adapter-weight", str(weight)])
        run(cmd, a.out / "logs" / f"eval-{tag}.log")
    report = json.loads(out.read_text())
    return {"name": name, "weight": report["settings"].get("adapter_weight") if adapter is not None else None,
            "tag": tag.split("@")[1] if "@" in tag else None, "weight_chosen_by": report.get("adapter_weight_chosen_by"),
            **report}


def adapter_runs(a) -> dict[str, list[str]]:
    rt, paper, oracle = (str(a.out / "groups" / n) for n in ("invdiff-rt", "paper", "oracle"))
    # default and oracle rows use the recipe's defaults (lambda 0, JTT sampling), one adapter per training seed;
    # the lambda-1 row is the ablation of the variance term on the same groups
    runs = {"erm": ["--recipe", "erm"], "paper": ["--recipe", "paper", "--groups", paper],
            "default-lambda1": ["--groups", rt, "--lambda", "1"]}
    for s in range(a.seeds):
        runs[f"default-s{s}"] = ["--groups", rt, "--seed", str(s)]
        runs[f"oracle-s{s}"] = ["--groups", oracle, "--seed", str(s)]
    only = [v for v in a.only.split(",") if v]
    return {k: v for k, v in runs.items() if not only or any(k.startswith(o) for o in only)}


COLS = ("bias", "bias_filtered", "majority_share", "fidelity", "fid")


def _stat(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {sd:.3f}"


def _spread(rows: list[dict]) -> str:
    """Lowest and highest per-prompt majority share (each the mean over seeds)."""
    shares = [[p["majority_share"] for p in r.get("per_prompt", {}).values()] for r in rows]
    if not all(shares):
        return "–"
    lo, hi = (sum(f(s) for s in shares) / len(shares) for f in (min, max))
    return f"{lo:.2f}–{hi:.2f}"


def _group_cells(rows: list[dict], groups: dict, name: str, out: Path) -> tuple[str, str, str, str]:
    key = "oracle" if name.startswith("oracle") else "paper" if name == "paper" else \
        None if name in ("base", "erm") else "invdiff-rt"
    diag = groups.get(key, {}).get("diagnostics", {}) if key else {}
    auroc, eff = diag.get("auroc"), diag.get("minority_effective_weight")
    manifest = out / "adapters" / rows[0]["name"] / "adapter.json"
    meta = json.loads(manifest.read_text()) if manifest.exists() else {}
    return (f"{auroc:.3f}" if auroc is not None else "–", f"{eff:.3f}" if eff is not None else "–",
            str(meta.get("parameter_count", "–")), str(round(meta["training_seconds"])) if meta else "–")


def render(out: Path) -> str:
    """Markdown table: one line per (variant, weight), mean ± sd over adapter-training seeds."""
    if (out / "table.json").exists():
        data = json.loads((out / "table.json").read_text())
        rows, groups = data["rows"], data["groups"]
    else:  # a partial run: whatever evaluations and groups exist so far
        rows = [{"name": f.stem.split("@")[0], "tag": f.stem.split("@")[1] if "@" in f.stem else None,
                 **(r := json.loads(f.read_text())), "weight": r["settings"].get("adapter_weight")}
                for f in sorted((out / "evals").glob("*.json"))]
        groups = {f.stem: json.loads(f.read_text()) for f in (out / "groups").glob("*.json")}
    keyed: dict[tuple[str, float | None, int], list[dict]] = {}
    for r in rows:
        variant = r["name"].rsplit("-s", 1)[0] if r["name"].startswith(("default-s", "oracle-s")) else r["name"]
        keyed.setdefault((variant, r.get("tag"), r["n_per_prompt"]), []).append(r)
    head = ["variant", "w", "N", "seeds", *COLS, "per-prompt majority share (min–max)", "group AUROC", "eff. minority weight", "adapter params",
            "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ("base", "erm", "paper", "default", "default-lambda1", "oracle")
    label = {"default": "invdiff-rt (default, λ=0)", "default-lambda1": "invdiff-rt, λ=1", "oracle": "oracle groups"}
    rank = {v: i for i, v in enumerate(order)}

    def order_key(kv):
        tag = kv[0][1]
        return rank.get(kv[0][0], 99), -1.0 if tag in (None, "rec") else float(tag)

    for (variant, tag, n), rs in sorted(keyed.items(), key=order_key):
        weight = "–" if tag is None else _stat([r["weight"] for r in rs]) + (" (recorded)" if tag == "rec" else "")
        cells = [_stat([r.get(c) for r in rs]) for c in COLS] + [_spread(rs)]
        lines.append("| " + " | ".join([label.get(variant, variant), weight, str(n), str(len(rs)),
                                        *cells, *_group_cells(rs, groups, variant, out)]) + " |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--attribute", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-prompt", type=int, default=128)
    p.add_argument("--sweep-per-prompt", type=int, default=64, help="N of the weight sweep (0: no sweep)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="adapter steps (default: each recipe's)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale of every evaluation (default: "
                   "the sampler's)")
    p.add_argument("--only", default="", help="Comma-separated adapter-run prefixes to run (default: all), e.g. "
                   "default,oracle")
    p.add_argument("--render", action="store_true", help="Only render OUT/table.md from OUT/table.json.")
    a = p.parse_args()
    if a.render:
        print(render(a.out))
        return
    (a.out / "logs").mkdir(parents=True, exist_ok=True)
    # trainings share `--jobs` workers; evaluations run `--jobs` at a time beside them, as adapters finish
    with ThreadPoolExecutor(a.jobs) as pool, ThreadPoolExecutor(a.jobs) as eval_pool:
        futures = [pool.submit(groups_step, a, "invdiff-rt", []), pool.submit(groups_step, a, "oracle",
                                                                              ["--oracle-groups-from", a.attribute])]
        if "paper" in adapter_runs(a):
            futures.append(pool.submit(groups_step, a, "paper", ["--recipe", "paper"]))
        evals = [eval_pool.submit(eval_step, a, "base", None, None, a.per_prompt)]
        [f.result() for f in futures]
        adapters = {name: pool.submit(train_step, a, name, extra) for name, extra in adapter_runs(a).items()}
        for name, fut in adapters.items():
            path = fut.result()
            evals.append(eval_pool.submit(eval_step, a, name, path, None, a.per_prompt))  # the recorded weight
            if name in ("default-s0", "oracle-s0") and a.sweep_per_prompt:  # the sweep on the first seed
                evals += [eval_pool.submit(eval_step, a, name, path, w, a.sweep_per_prompt) for w in SWEEP]
        rows = [f.result() for f in evals]
    groups = {n: json.loads(f.read_text()) for n in ("invdiff-rt", "paper", "oracle")
              if (f := a.out / "groups" / f"{n}.json").exists()}
    (a.out / "table.json").write_text(json.dumps({"rows": rows, "groups": groups}, indent=2, default=str))
    print(render(a.out))


if __name__ == "__main__":
    main()
