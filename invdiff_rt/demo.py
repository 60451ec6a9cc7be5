"""`invdiff demo`: the whole pipeline on the embedded colored-digits benchmark, end to end.

data -> groups -> adapter -> export (with and without adapter) -> generate and eval (base vs debiased) on the fastest
backend of the exports -> bench -> report.md

Every stage writes `OUT/<stage>/stage.json` holding a fingerprint of its inputs and its result; a rerun reuses any stage
whose inputs did not change, so a second `make demo` is fast.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from .artifacts import (atomic_path, atomic_write_json, atomic_write_text, holds_current_folder, read_json,
                        sha256_json)
from .errors import InvdiffError
from .method.defaults import ADAPTER_STEPS, CALIBRATION_MIN_SAMPLES, CALIBRATION_PER_PROMPT

BENCHMARK = "colored-digits"
ATTRIBUTE = "color"
CHART = "bias_per_prompt.png"


@dataclass(frozen=True)
class DemoConfig:
    model: str = BENCHMARK        # built-in name or a diffusers directory trained on the benchmark
    per_prompt: int = 32          # eval images per prompt (noise floor 0.8/sqrt(N))
    generate_per_prompt: int = 4  # images per prompt written by `generate`
    train_steps: int = ADAPTER_STEPS  # the invdiff-rt recipe's default (README, debiasing table)
    calibrate_per_prompt: int = CALIBRATION_PER_PROMPT  # samples per prompt per tried weight of the weight rule
    calibrate_min_samples: int = CALIBRATION_MIN_SAMPLES  # ... raised to reach this many in all
    seed: int = 0
    bench_batch_sizes: tuple[int, ...] = (1, 8)
    bench_steps: int = 10
    bench_repeats: int = 3
    threads: int | None = None


MARKER = "demo.json"  # written first: a folder holding it is a demo's, whose stage folders a rerun may replace
OUT_TOKEN = "$OUT"  # stage records name the demo's own files relative to it: a moved or copied demo reuses its own


class Stages:
    """Run-or-reuse for fingerprinted stages under one output folder. A stage whose inputs changed starts from an
    empty folder (its old outputs came from other inputs: `generate` refuses to mix settings in one image folder)."""

    def __init__(self, out: Path, console: Console):
        self.out, self.console, self.timings = out, console, {}

    def run(self, name: str, inputs: dict, fn: Callable[[Path], dict]) -> dict:
        folder = self.out / name
        record = folder / "stage.json"
        key = sha256_json(inputs)
        if record.exists():
            old = read_json(record, f"{name} stage record")
            if old.get("key") == key:
                self.console.print(f"{name}: reusing {folder}", style="dim", markup=False)
                self.timings[name] = 0.0
                return _paths(old["result"], OUT_TOKEN, str(self.out))
            record.unlink()  # stale: first the record, so an interruption below cannot leave it looking valid
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.console.rule(name)
        start = time.perf_counter()
        result = fn(folder)
        self.timings[name] = round(time.perf_counter() - start, 1)
        atomic_write_json(record, {"key": key, "inputs": inputs, "result": _paths(result, str(self.out), OUT_TOKEN),
                                   "seconds": self.timings[name]})
        return result


def _paths(value, old: str, new: str):
    """`value` (a stage result) with every string path under `old` re-rooted under `new`."""
    if isinstance(value, dict):
        return {k: _paths(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_paths(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old):]
    return value


def check_demo_folder(out: str | Path, flag: str = "--out") -> None:
    """A rerun deletes the stage folders whose inputs changed: --out must be new, empty or a demo's (a folder of
    the user's with a `bench/` or `export/` in it lost them)."""
    out = Path(out)
    if holds_current_folder(out):
        raise InvdiffError(f"{flag} {out}: holds the current folder, whose files a rerun could delete; pass a new "
                           "folder (default runs/demo)")
    legacy = (out / "data" / "stage.json").is_file()  # a demo folder from before the marker
    if out.is_dir() and any(out.iterdir()) and not ((out / MARKER).is_file() or legacy):
        raise InvdiffError(f"{flag} {out}: holds other files (no {MARKER}), which a rerun could delete; pass a new "
                           "or empty folder")


def _data(folder: Path, cfg: DemoConfig) -> dict:
    from .data.folder import data_fingerprint
    from .data.recipes import RECIPES

    path = RECIPES[BENCHMARK](folder / "dataset", bias=0.95, seed=cfg.seed, size=32)
    return {"path": str(path), "fingerprint": data_fingerprint(path, "train")}


def _groups(folder: Path, model, data: str, cfg: DemoConfig) -> dict:
    from .method.grouper import infer_groups, save_groups

    result = infer_groups(model, data, recipe="invdiff-rt", seed=cfg.seed, report_attribute=ATTRIBUTE)
    safetensors, meta = save_groups(result, folder / "groups")
    return {"prefix": str(folder / "groups"), "fingerprint": result.fingerprint, "meta": read_json(meta)}


def _recipe_defaults() -> dict:
    """The default recipe's settings, the weight rule and the second-split test's settings: part of the adapter
    stage's key, so a changed recipe retrains and a changed rule recalibrates."""
    from .method.calibrate import RULE, CalibrateConfig
    from .method.train import RECIPE_DEFAULTS

    from .method import splits

    return {**RECIPE_DEFAULTS["invdiff-rt"], "weight_rule": RULE,
            "weight_rule_samples": {"pairs": CalibrateConfig.pairs, "paired": CalibrateConfig.paired,
                                    "flag_width": CalibrateConfig.flag_width,
                                    "inferred_scorings": CalibrateConfig.inferred_scorings,
                                    "centre": CalibrateConfig.centre},
            "split_test": splits.TEST_SETTINGS}


def _adapter(folder: Path, model, data: str, groups_prefix: str, cfg: DemoConfig) -> dict:
    from .method.adapter import adapter_fingerprint, read_adapter_manifest
    from .method.grouper import load_groups
    from .method.train import TrainConfig, train_adapter

    out = train_adapter(model, data, load_groups(groups_prefix), folder / "adapter",
                        TrainConfig(steps=cfg.train_steps, seed=cfg.seed,
                                    calibrate_per_prompt=cfg.calibrate_per_prompt,
                                    calibrate_min_samples=cfg.calibrate_min_samples))
    return {"path": str(out), "fingerprint": adapter_fingerprint(out), "manifest": read_adapter_manifest(out)}


def _export(folder: Path, model, adapter_dir: str) -> dict:
    """The fused export with the adapter (generate, eval-debiased, bench) and, side by side in a second process,
    the base model's (eval-base and the bench's adapter-overhead pair): export is mostly single-threaded Python, so
    on two cores the pair costs about what one export does."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from .export.manifest import export_model

    from .parallel import die_with_parent

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent) as pool:
        base = pool.submit(export_model, str(model.path), folder / "onnx-base", precision="fp32")
        out = export_model(model.path, folder / "onnx", adapter_dir=adapter_dir, precision="fp32")
        base_out = Path(base.result())
    return {"path": str(out), "manifest": read_json(out / "manifest.json"), "base_path": str(base_out),
            "base_manifest": read_json(base_out / "manifest.json")}


def _runtime(export_dir: str, cfg: DemoConfig):
    """The fastest backend that runs `export_dir` (`auto`: TensorRT, ONNX Runtime CUDA, ONNX Runtime CPU)."""
    from .runtime.backends import load_runtime, resolve_backend

    return load_runtime(resolve_backend("auto", export_dir=export_dir), export_dir=export_dir, threads=cfg.threads)


def _generate(folder: Path, export_dir: str, prompts: list[str], weight: float, cfg: DemoConfig) -> dict:
    from .runtime.backends import resolve_backend
    from .runtime.generate import generate

    backend = resolve_backend("auto", export_dir=export_dir)
    result = generate(prompts, folder / "images", export=export_dir, backend=backend, num=cfg.generate_per_prompt,
                      seed=cfg.seed, adapter_weight=weight, threads=cfg.threads)
    return {"backend": backend, "dir": str(folder / "images"), "summary": result.summary(),
            "images_per_s": result.images_per_s}


def _evaluate(folder: Path, model, data: str, export_dir: str, max_batch: int, adapter_dir: str | None,
              weight: float, cfg: DemoConfig) -> dict:
    """`invdiff eval` through the export's fastest backend, in batches within its `max_batch` (engine profiles);
    the adapter is baked into the export, `adapter_dir` is only fingerprinted."""
    from .eval.evaluate import run_evaluation
    from .eval.plots import save_grid

    run = run_evaluation(model, data, ATTRIBUTE, per_prompt=cfg.per_prompt, seed=cfg.seed, adapter=adapter_dir,
                         adapter_weight=weight, denoiser=_runtime(export_dir, cfg), batch_size=min(64, max_batch))
    save_grid(folder / "grid.png", run.images, n_rows=len(run.prompts))
    atomic_write_json(folder / "eval.json", run.report)
    return run.report


BENCH_BACKENDS = ("torch", "onnxruntime", "openvino")  # + eager, always; openvino is what `--backend auto` runs
BENCH_SETTINGS = ("model", "bench_batch_sizes", "bench_steps", "bench_repeats", "threads")  # its key (not --per-prompt)


def _bench(folder: Path, export: dict, model_dir: str, adapter_dir: str, cfg: DemoConfig) -> dict:
    from .bench import BenchConfig, plot, run_bench, write_json
    from .runtime.sampling import DEFAULT_GUIDANCE

    bc = BenchConfig(backends=list(BENCH_BACKENDS), batch_sizes=list(cfg.bench_batch_sizes), model=model_dir,
                     adapter=adapter_dir, export=export["path"], base_export=export["base_path"],
                     steps=cfg.bench_steps, warmup=1, repeats=1, rounds=cfg.bench_repeats, threads=cfg.threads,
                     guidance_scale=DEFAULT_GUIDANCE)
    result = run_bench(bc)
    write_json(result, folder / "bench.json")
    plot(result, folder / "latency.png")
    return result


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), console: Console | None = None) -> Path:
    import torch

    from .method.splits import CANDIDATE_SETTINGS  # in the groups stage's key: a changed candidate rule regroups
    from .models.loader import load_model

    check_demo_folder(out)
    out, console = Path(out).resolve(), console or Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # groups, training and calibration too, not only the runtimes
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, {"format": "invdiff-demo", "config": asdict(cfg)})
    for stale in (out / "report.md", out / CHART):  # rewritten at the end: never left describing older stages
        stale.unlink(missing_ok=True)
    stages = Stages(out, console)
    model = load_model(cfg.model)
    data = stages.run("data", {"recipe": BENCHMARK, "seed": cfg.seed}, lambda f: _data(f, cfg))
    base = {"model": model.fingerprint, "data": data["fingerprint"]}
    groups = stages.run("groups", {**base, "seed": cfg.seed, "candidate": CANDIDATE_SETTINGS},
                        lambda f: _groups(f, model, data["path"], cfg))
    adapter = stages.run("adapter", {**base, "groups": groups["fingerprint"], "steps": cfg.train_steps,
                                     "calibrate_per_prompt": cfg.calibrate_per_prompt,
                                     "calibrate_min_samples": cfg.calibrate_min_samples,
                                     "seed": cfg.seed, "recipe": _recipe_defaults()},
                         lambda f: _adapter(f, model, data["path"], groups["prefix"], cfg))
    from .method.calibrate import resolve_weight
    from .runtime.sampling import DEFAULT_GUIDANCE

    weight, how = resolve_weight(None, DEFAULT_GUIDANCE, adapter_dir=adapter["path"])
    console.print(f"adapter weight {weight:g}: {how}", highlight=False, markup=False)
    # "outputs" names the folders the stage writes: a record from before it also wrote onnx-base is not reused
    export = stages.run("export", {**base, "adapter": adapter["fingerprint"], "outputs": ["onnx", "onnx-base"]},
                        lambda f: _export(f, model, adapter["path"]))
    with_adapter, without = export["manifest"], export["base_manifest"]
    prompts = sorted(data_prompts(data["path"]))
    generated = stages.run("generate", {"export": with_adapter.get("files"), "weight": weight,
                                        "n": cfg.generate_per_prompt},
                           lambda f: _generate(f, export["path"], prompts, weight, cfg))
    ev = {"n": cfg.per_prompt, "seed": cfg.seed, **base, "classifier": _classifier_fingerprint()}
    before = stages.run("eval-base", {**ev, "export": without["files"]},
                        lambda f: _evaluate(f, model, data["path"], export["base_path"], without["max_batch"], None,
                                            0.0, cfg))
    after = stages.run("eval-debiased", {**ev, "adapter": adapter["fingerprint"], "weight": weight,
                                         "export": with_adapter.get("files")},
                       lambda f: _evaluate(f, model, data["path"], export["path"], with_adapter["max_batch"],
                                           adapter["path"], weight, cfg))
    bench = stages.run("bench", bench_inputs(cfg, with_adapter, without),
                       lambda f: _bench(f, export, str(model.path), adapter["path"], cfg))
    report = write_report(out, cfg, data, groups, adapter, generated, before, after, bench, stages.timings,
                          (weight, how))
    print_summary(console, before, after, bench, weight, stages.timings)
    return report


def bench_inputs(cfg: DemoConfig, with_adapter: dict, without: dict) -> dict:
    """The bench stage's key: the two exports and the bench's own settings (not --per-prompt: it reran 196 s)."""
    return {"export": with_adapter.get("files"), "base": without["files"],
            "cfg": {k: getattr(cfg, k) for k in BENCH_SETTINGS}, "backends": BENCH_BACKENDS}


def _classifier_fingerprint() -> str:
    """The shipped classifiers the eval stages score with (in their key: new classifiers re-evaluate)."""
    from .artifacts import fingerprint_dir
    from .eval.classifiers import default_classifier_dir

    return fingerprint_dir(default_classifier_dir(BENCHMARK))


def data_prompts(data_dir: str) -> list[str]:
    from .data.folder import prompts_of, read_split

    return prompts_of(read_split(data_dir, "train"))


# ---------------------------------------------------------------- report

_ROWS = (("bias", "bias ↓"), ("bias_filtered", "bias, filtered ↓"), ("majority_share", "majority share"),
         ("fidelity", "fidelity ↑"), ("fid", "FID ↓"), ("precision", "precision ↑"), ("recall", "recall ↑"))


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def bench_rows(bench: dict) -> list[dict]:
    return list(bench.get("records", []))


def print_summary(console: Console, before: dict, after: dict, bench: dict, weight: float, timings: dict) -> None:
    table = Table(title=f"invdiff demo: {BENCHMARK}, N={before['n_per_prompt']} per prompt, adapter weight {weight}")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("debiased", justify="right")
    for key, label in _ROWS:
        table.add_row(label, _fmt(before.get(key)), _fmt(after.get(key)))
    console.print(table)
    perf = Table(title="runtime (per denoising step, fp32, CPU unless stated)")
    for col in ("backend", "batch", "step ms p50", "images/s", "x eager", "adapter overhead"):
        perf.add_column(col, justify="right")
    for r in bench_rows(bench):
        perf.add_row(r["backend"], str(r["batch_size"]), _fmt(r.get("step_ms_p50")), _fmt(r.get("images_per_s")),
                     _fmt(r.get("speedup_vs_eager")), _fmt(r.get("adapter_overhead")))
    console.print(perf)
    console.print(f"stage seconds: {timings} (total {sum(timings.values()):.0f} s)")


def bias_chart(path: Path, before: dict, after: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    prompts = list(before["per_prompt"])
    b = [before["per_prompt"][p].get("bias") or 0.0 for p in prompts]
    a = [after["per_prompt"][p].get("bias") or 0.0 for p in prompts]
    x = np.arange(len(prompts))
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.bar(x - 0.2, b, 0.4, label="base")
    ax.bar(x + 0.2, a, 0.4, label="debiased")
    ax.set_xticks(x, [p.split()[-1] for p in prompts])
    ax.set_ylabel("bias per prompt")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars: inside, it hid the last prompt's
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, cfg: DemoConfig, data, groups, adapter, generated, before, after, bench,
                 timings, weight: tuple[float, str] = (1.0, "")) -> Path:
    from .method.splits import describe

    bias_chart(out / CHART, before, after)
    diag = groups["meta"].get("diagnostics", {})
    lines = [f"# invdiff demo report ({BENCHMARK})", "",
             f"Config: `{asdict(cfg)}`", "", "## Bias before / after", "",
             "| metric | base | debiased |", "|---|---|---|"]
    lines += [f"| {label} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k, label in _ROWS]
    lines += ["", f"Adapter weight **{weight[0]:g}**: {weight[1]}.",
              "", f"Noise floor 0.8/sqrt(N) = {before.get('noise_floor')}.", "",
              f"![bias per prompt]({CHART})", "",
              "Base samples (rows = prompts):", "", "![base](eval-base/grid.png)", "",
              "Debiased samples:", "", "![debiased](eval-debiased/grid.png)", "",
              "## Groups (label-free)", "", f"Diagnostics (hidden column `{ATTRIBUTE}`, never an input): `{diag}`", "",
              f"Second split: {describe(adapter['manifest'].get('second_split'))}.", "",
              "## Runtime", "", "| backend | batch | step ms p50 | images/s | x eager | adapter overhead |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['batch_size']} | {_fmt(r.get('step_ms_p50'))} | {_fmt(r.get('images_per_s'))} "
              f"| {_fmt(r.get('speedup_vs_eager'))} | {_fmt(r.get('adapter_overhead'))} |" for r in bench_rows(bench)]
    lines += ["", "![latency](bench/latency.png)", "", f"Generation: {generated.get('summary')}", "",
              f"Stage seconds: `{timings}`", "", "Stage records (inputs, fingerprints, results): "
              + ", ".join(f"[{s}]({s}/stage.json)" for s in timings), ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))
