"""`invdiff bench`: per-stage latency, throughput and peak memory of each backend, side by side with the
diffusers-style `eager` baseline and with the base model without adapter.

Every backend runs in its own process (`python -m invdiff_rt.bench --worker JOB --out PART`), so thread pools of
different runtimes never fight and each peak-memory number belongs to one backend. A worker times every stage with
the adapter, records its peak memory, then loads the same backend without the adapter and times the two denoising
steps interleaved call by call: the adapter overhead is the median of those paired ratios, so load from other
processes on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import artifacts
from .errors import InvdiffError
from .runtime.defaults import DEFAULT_GUIDANCE

FORMAT = "invdiff-rt/bench"
FORMAT_VERSION = 1
BACKENDS = ("eager", "torch", "onnxruntime", "tensorrt")
ENGINE_BACKENDS = ("onnxruntime", "tensorrt")  # run from an ONNX export folder
STAGES = ("text", "step", "loop", "decode", "e2e")
RECORD_KEYS = ("backend", "batch_size", "step_ms_p50", "step_ms_p90", "images_per_s", "peak_mem_mb",
               "speedup_vs_eager", "adapter_overhead")
PROMPT = "a photo of the digit {}"


# --- statistics ------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation between order statistics (numpy's default)."""
    if len(values) == 0:
        raise ValueError("percentile of an empty list")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(times_ms: list[float]) -> dict[str, float]:
    """p50 / p90 / mean / min / max / n of a list of milliseconds."""
    return {"p50": percentile(times_ms, 50), "p90": percentile(times_ms, 90), "mean": float(np.mean(times_ms)),
            "min": float(min(times_ms)), "max": float(max(times_ms)), "n": len(times_ms)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


# --- timing and memory (inside a worker) ---------------------------------------------------------------------------


def synchronizer(device) -> Callable[[], None]:
    """Waits for queued device work (CUDA) so that wall-clock times cover it; a no-op on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` untimed ones; the device is synchronised around each."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def peak_host_mb() -> float:
    """Peak resident set size of this process's own address space.

    Linux: VmHWM from /proc/self/status. Not ru_maxrss: the kernel carries the parent's RSS at fork into a child's
    ru_maxrss across exec, so every worker would report at least the (large) parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def peak_device_mb() -> float | None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# --- the baseline -------------------------------------------------------------------------------------------------


class EagerRuntime:
    """The diffusers way: PyTorch eager UNet called at 2B, the adapter as a separate module call, the CFG combine in
    Python with `chunk`; driven by the same diffusers scheduler loop as every backend."""

    name = "eager"
    cfg = True

    def __init__(self, model, adapter=None):
        self.model = model
        self.unet = model.unet
        self.adapter = adapter
        self.device = model.device
        self.latent_shape = model.latent_shape
        self.scheduler_config = model.scheduler_config

    def encode_text(self, prompts: list[str]):
        return self.model.encode_text(prompts)

    def denoise_step(self, sample, timestep, text_embeddings, guidance_scale: float, adapter_weight: float):
        import torch

        with torch.no_grad():
            x2, t2 = torch.cat([sample] * 2), torch.cat([timestep] * 2)
            eps = self.unet(x2, t2, encoder_hidden_states=text_embeddings).sample
            if self.adapter is not None:
                eps = eps + adapter_weight * self.adapter(x2, t2, text_embeddings, eps)
            eps_cond, eps_uncond = eps.chunk(2)
            return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def decode(self, latents):
        return self.model.decode(latents)


# --- benchmark configuration and jobs ---------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    backends: list[str]
    batch_sizes: list[int]
    model: str | None = None
    adapter: str | None = None
    export: str | None = None
    base_export: str | None = None  # the same model exported without adapter (engine backends' overhead pair)
    steps: int = 20
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None
    precision: str = "fp32"
    scheduler: str = "ddim"
    guidance_scale: float = DEFAULT_GUIDANCE
    adapter_weight: float = 1.0
    seed: int = 0
    engines: str = "engines"  # TensorRT engine cache (content-addressed: reused across runs)
    latent_shape: list[int] | None = None  # from --height/--width (None: the model's size)

    def check(self) -> "BenchConfig":
        """Refuse bad flags before anything runs (one-line errors)."""
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise InvdiffError(f"--backends: unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvdiffError("--batch-sizes: pass positive integers, e.g. --batch-sizes 1,8,32")
        for flag, value, low in (("--steps", self.steps, 1), ("--repeats", self.repeats, 1),
                                 ("--warmup", self.warmup, 0)):
            if value < low:
                raise InvdiffError(f"{flag} {value}: must be at least {low}")
        if self.threads is not None and self.threads < 1:
            raise InvdiffError(f"--threads {self.threads}: must be at least 1 (or leave it out)")
        from .runtime.sampling import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise InvdiffError(f"--scheduler {self.scheduler}: unknown; choose one of {', '.join(SCHEDULERS)}")
        if self.precision not in ("fp32", "fp16"):
            raise InvdiffError(f"--precision {self.precision}: choose fp32 or fp16")
        if self.model is None and self.export is None:
            raise InvdiffError("--model/--export: pass a model folder (with optional --adapter) or an export folder")
        return self

    @property
    def run_backends(self) -> list[str]:
        """`eager` first (always), then the requested backends, each once."""
        return list(dict.fromkeys(["eager", *self.backends]))


def parse_list(text: str, flag: str, cast: Callable[[str], Any] = str) -> list:
    """'1,8, 32' -> [1, 8, 32]; one-line error naming the flag on a bad item."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise InvdiffError(f"{flag} {text}: not a comma-separated list of {cast.__name__}") from None


@dataclass
class Job:
    """What one worker process times: one backend from a model (+adapter) or an export folder, and the same backend
    without the adapter (`base`: the fields to replace, e.g. {"adapter": None} or {"export": BASE_EXPORT})."""

    backend: str
    config: dict
    model: str | None = None
    adapter: str | None = None
    export: str | None = None
    engines: str | None = None
    base: dict | None = None
    stages: list[str] = field(default_factory=lambda: list(STAGES))

    @classmethod
    def from_json(cls, data: dict) -> "Job":
        return cls(**data)


# --- worker --------------------------------------------------------------------------------------------------------


def job_device(precision: str):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if precision == "fp16" and device == "cuda" else torch.float32
    return device, dtype


def load_job_runtime(job: Job):
    """The runtime a job times: eager/torch from the model (+adapter), engine backends from the export folder."""
    from .runtime.backends import is_available, load_runtime

    cfg = job.config
    if job.backend in ENGINE_BACKENDS:
        name = "onnxruntime-cuda" if job.backend == "onnxruntime" and is_available("onnxruntime-cuda") else job.backend
        return load_runtime(name, export_dir=job.export, precision=cfg["precision"], threads=cfg["threads"],
                            engines_dir=job.engines)
    from .method.adapter import load_adapter
    from .models.loader import load_model

    device, dtype = job_device(cfg["precision"])
    model = load_model(job.model, device=device, dtype=dtype)
    adapter = load_adapter(job.adapter, model).to(device, dtype) if job.adapter else None
    if job.backend == "eager":
        return EagerRuntime(model, adapter)
    name = "torch-cuda" if device == "cuda" else "torch"
    return load_runtime(name, model=model, adapter=adapter, precision=cfg["precision"], threads=cfg["threads"])


def stage_calls(runtime, batch: int, cfg: dict) -> dict[str, Callable[[], Any]]:
    """One zero-argument callable per stage, on fixed seeded inputs."""
    import torch

    from .runtime.sampling import cfg_embeddings, denoise, initial_latents, make_scheduler

    device = getattr(runtime, "device", torch.device("cpu"))
    prompts = [PROMPT.format(i % 10) for i in range(batch)]
    gs, aw, steps = cfg["guidance_scale"], cfg["adapter_weight"], cfg["steps"]
    shape = cfg.get("latent_shape") or runtime.latent_shape
    latents = torch.stack([initial_latents(cfg["seed"], p, i, shape) for i, p in enumerate(prompts)]).to(device)
    emb = cfg_embeddings(runtime, prompts, gs)
    sched = make_scheduler(runtime.scheduler_config, cfg["scheduler"])
    timestep = torch.full((batch,), 500.0, device=device)
    step_in = latents.to(emb.dtype)

    def loop():
        return denoise(runtime, sched, latents, emb, gs, aw, steps)

    def e2e():
        return runtime.decode(denoise(runtime, sched, latents, cfg_embeddings(runtime, prompts, gs), gs, aw, steps))

    return {"text": lambda: cfg_embeddings(runtime, prompts, gs),
            "step": lambda: runtime.denoise_step(step_in, timestep, emb, gs, aw),
            "loop": loop, "decode": lambda: runtime.decode(latents), "e2e": e2e}


def paired_steps(runtime, base, batch: int, cfg: dict, sync: Callable[[], None]) -> dict:
    """The denoising step with and without the adapter, interleaved pair by pair (the order alternates), so that
    any load on the machine hits both alike; `overhead` = median of the per-pair time ratios. Each timed call follows
    one untimed call of the same runtime: switching runtimes has its own cost (the other runtime's thread pool
    still spinning, cold caches) that belongs to neither."""
    with_adapter, without = stage_calls(runtime, batch, cfg)["step"], stage_calls(base, batch, cfg)["step"]
    for _ in range(cfg["warmup"]):
        with_adapter(), without()
    times: dict[str, list[float]] = {"adapter": [], "base": []}
    for i in range(cfg["repeats"]):
        pair = (("adapter", with_adapter), ("base", without))
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            times[name] += time_calls(fn, 1, 1, sync)
    ratios = np.asarray(times["adapter"]) / np.asarray(times["base"])
    return {"adapter": summarize(times["adapter"]), "base": summarize(times["base"]),
            "overhead": float(np.median(ratios))}


def run_job(job: Job, log: Callable[[str], None] = lambda s: None) -> dict:
    """Time every stage of `job` at every batch size, then the paired adapter/base step; returns the worker's part
    (records + the peak memory of the adapter runtime alone)."""
    import dataclasses

    import torch

    cfg = job.config
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    runtime = load_job_runtime(job)
    sync = synchronizer(getattr(runtime, "device", "cpu"))
    records = []
    with torch.inference_mode():
        for batch in cfg["batch_sizes"]:
            calls = stage_calls(runtime, batch, cfg)
            stages = {}
            for stage in job.stages:
                warmup = cfg["warmup"] if stage in ("text", "step", "decode") else min(cfg["warmup"], 1)
                stages[stage] = summarize(time_calls(calls[stage], warmup, cfg["repeats"], sync))
                log(f"{job.backend} batch {batch} {stage}: p50 {stages[stage]['p50']:.2f} ms")
            records.append({"backend": job.backend, "batch_size": batch, "stages": stages})
        peak = {"peak_host_mb": peak_host_mb(), "peak_device_mb": peak_device_mb()}
        if job.base is not None:
            base = load_job_runtime(dataclasses.replace(job, base=None, **job.base))
            for rec in records:
                rec["paired"] = paired_steps(runtime, base, rec["batch_size"], cfg, sync)
                log(f"{job.backend} batch {rec['batch_size']} adapter overhead {rec['paired']['overhead']:.3f}x")
    return {"records": records, **peak, "torch_threads": torch.get_num_threads()}


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process: read the job JSON, time it, write the part JSON."""
    parser = argparse.ArgumentParser(prog="python -m invdiff_rt.bench")
    parser.add_argument("--worker", required=True, help="job JSON written by `invdiff bench`")
    parser.add_argument("--out", required=True, help="part JSON to write")
    args = parser.parse_args(argv)
    try:
        job = Job.from_json(artifacts.read_json(args.worker, "bench job"))
        part = run_job(job, log=lambda s: print(s, file=sys.stderr, flush=True))
    except InvdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    artifacts.atomic_write_json(args.out, {**part, "job": asdict(job)})
    return 0


# --- orchestration ---------------------------------------------------------------------------------------------------


def spawn_worker(job: Job, workdir: Path, log: Callable[[str], None]) -> dict:
    """Run one job in a fresh Python process; its one-line error becomes ours."""
    name = job.backend
    job_path, part_path = workdir / f"{name}.job.json", workdir / f"{name}.part.json"
    artifacts.atomic_write_json(job_path, asdict(job))
    cmd = [sys.executable, "-m", "invdiff_rt.bench", "--worker", str(job_path), "--out", str(part_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not part_path.exists():
        lines = [s for s in proc.stderr.splitlines() if s.strip()]
        last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
        raise InvdiffError(f"--backends {job.backend}: its benchmark failed ({last})")
    log(f"{name}: {time.perf_counter() - start:.1f} s")
    return artifacts.read_json(part_path, "bench part")


def fresh_adapter(model_dir: str, out_dir: Path, seed: int) -> Path:
    """Save a freshly initialised adapter of the default architecture (its zero last layer costs the same)."""
    import torch

    from .method.adapter import GuidanceAdapter, config_for_unet, save_adapter
    from .models.loader import load_model

    model = load_model(model_dir)
    torch.manual_seed(seed)
    adapter = GuidanceAdapter(config_for_unet(model.unet))
    return save_adapter(adapter, out_dir, {"base_fingerprint": model.fingerprint, "recipe": "fresh (bench)"})


def export_variant(model_dir: str, adapter_dir: str | None, out_dir: Path, config: BenchConfig,
                   components: tuple[str, ...] | None = None) -> Path:
    """An ONNX export folder of the model (with or without adapter) for the engine backends."""
    from .export.manifest import export_model

    return export_model(model_dir, out_dir, adapter_dir=adapter_dir, precision=config.precision,
                        max_batch=max(config.batch_sizes), components=components)


# the base variant times the denoising step only: its denoiser + the text encoder that makes its inputs
BASE_PARTS = ("denoiser", "text_encoder")


def check_base_export(base_export: str, adapter_export: str, config: BenchConfig) -> str:
    """`--base-export`: an export of the same base model, without adapter, holding the parts the pair needs, at the
    bench's precision and batch range; one-line errors otherwise."""
    from .export.manifest import read_manifest

    flag = f"--base-export {base_export}"
    if not Path(base_export).is_dir():
        raise InvdiffError(f"{flag}: not an export folder; run `invdiff export --model MODEL` without --adapter")
    base, with_adapter = read_manifest(base_export), read_manifest(adapter_export, verify=False)
    if base.get("adapter"):
        raise InvdiffError(f"{flag}: exported with an adapter; export the base model without --adapter")
    if base.get("base_fingerprint") != with_adapter.get("base_fingerprint"):
        raise InvdiffError(f"{flag}: exported from another base model than the adapter export; re-export it "
                           "from the same --model")
    missing = [c for c in BASE_PARTS if c not in base.get("components", {})]
    if missing:
        raise InvdiffError(f"{flag}: has no {missing[0]}; export it with that component")
    if base.get("cfg") != with_adapter.get("cfg"):
        raise InvdiffError(f"{flag}: exported with cfg={base.get('cfg')}, the adapter export with "
                           f"cfg={with_adapter.get('cfg')}; export both the same way")
    if base.get("precision") != config.precision or base.get("max_batch", 0) < max(config.batch_sizes):
        raise InvdiffError(f"{flag}: exported at {base.get('precision')} up to batch {base.get('max_batch')}; "
                           f"re-export with --precision {config.precision} --max-batch {max(config.batch_sizes)}")
    return str(base_export)


def resolve_sources(config: BenchConfig, tmp: Path) -> tuple[str, str]:
    """(model folder, adapter folder) that the eager and torch backends time; a fresh adapter without --adapter."""
    from .method.adapter import read_adapter_manifest
    from .models.loader import resolve_model

    if config.model is not None:
        resolve_model(config.model)
    if config.adapter is not None:
        read_adapter_manifest(config.adapter)
    if config.export is None:
        return config.model, config.adapter or str(fresh_adapter(config.model, tmp / "fresh_adapter", config.seed))
    from .export.manifest import read_manifest

    manifest = read_manifest(config.export, verify=False)
    recorded = manifest.get("adapter") or {}
    if not recorded:
        raise InvdiffError(f"--export {config.export}: exported without an adapter; export with --adapter, "
                           "or bench --model without --export")
    model = config.model or manifest.get("base_model")
    if not (model and (Path(model) / "model_index.json").exists()):
        raise InvdiffError(f"--export {config.export}: its base model {model!r} is not on this machine; pass "
                           "--model MODEL_DIR (the eager baseline needs it)")
    adapter = config.adapter or recorded.get("source")
    if not (adapter and Path(adapter).is_dir()):
        raise InvdiffError(f"--export {config.export}: its adapter folder {adapter!r} is not on this machine; "
                           "pass --adapter ADAPTER_DIR")
    return model, adapter


def build_engines(export_dirs, engines_dir: str, log: Callable[[str], None]) -> None:
    """Build (or reuse from the cache) the TensorRT engines of each export folder."""
    from .export import tensorrt as trt_export

    trt_export.require_tensorrt("bench --backends tensorrt")
    for export_dir in export_dirs:
        for name, plan, reused in trt_export.build_export(export_dir, engines_dir, trt_export.BuildOptions()):
            log(f"tensorrt {name}: {'cached' if reused else 'built'} {plan}")


def plan_jobs(config: BenchConfig, tmp: Path, log: Callable[[str], None]) -> list[Job]:
    """One job per backend (with its base variant); exports what the engine backends need into `tmp`."""
    model, adapter = resolve_sources(config, tmp)
    exports = {}
    if any(b in ENGINE_BACKENDS for b in config.run_backends):
        exports["adapter"] = config.export or str(export_variant(model, adapter, tmp / "export_adapter", config))
        if config.base_export:
            exports["base"] = check_base_export(config.base_export, exports["adapter"], config)
        else:
            exports["base"] = str(export_variant(model, None, tmp / "export_base", config, BASE_PARTS))
        log("ONNX variants with and without adapter: " + ", ".join(exports.values()))
    if "tensorrt" in config.run_backends:
        build_engines(exports.values(), config.engines, log)
    jobs = []
    for backend in config.run_backends:
        if backend in ENGINE_BACKENDS:
            source, base = {"export": exports["adapter"], "engines": config.engines}, {"export": exports["base"]}
        else:
            source, base = {"model": model, "adapter": adapter}, {"adapter": None}
        jobs.append(Job(backend, asdict(config), base=base, **source))
    return jobs


def merge_records(parts: list[dict]) -> list[dict]:
    """One record per (backend, batch size) with ratios to `eager` and to the base model on the same backend."""
    pairs = [(r, p) for p in parts for r in p["records"]]
    eager = {r["batch_size"]: r for r, _ in pairs if r["backend"] == "eager"}
    return [make_record(rec, part, eager.get(rec["batch_size"])) for rec, part in pairs]


def make_record(rec: dict, part: dict, eager: dict | None) -> dict:
    stages, batch = rec["stages"], rec["batch_size"]
    out: dict[str, Any] = {"backend": rec["backend"], "batch_size": batch}
    for stage, s in stages.items():
        out[f"{stage}_ms_p50"], out[f"{stage}_ms_p90"] = s["p50"], s["p90"]
    e2e = stages.get("e2e", {}).get("p50")
    out["images_per_s"] = batch / (e2e / 1e3) if e2e else None
    out["peak_mem_mb"] = part["peak_host_mb"]
    out["peak_device_mb"] = part["peak_device_mb"]
    eager_stages = eager["stages"] if eager else {}
    out["speedup_vs_eager"] = ratio(eager_stages.get("step", {}).get("p50"), stages["step"]["p50"])
    out["e2e_speedup_vs_eager"] = ratio(eager_stages.get("e2e", {}).get("p50"), e2e)
    paired = rec.get("paired")
    out["base_step_ms_p50"] = paired["base"]["p50"] if paired else None
    out["adapter_overhead"] = paired["overhead"] if paired else None  # median of interleaved per-call ratios
    out["stages"] = stages
    if paired:
        out["paired"] = paired
    return out


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda s: None, isolate: bool = True) -> dict:
    """Run every job (each in its own process unless `isolate` is False) and return the result
    (records + machine + config)."""
    config.check()
    with tempfile.TemporaryDirectory(prefix="invdiff-bench-") as tmp:
        jobs = plan_jobs(config, Path(tmp), log)
        parts = [spawn_worker(job, Path(tmp), log) if isolate else run_job(job, log) for job in jobs]
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "machine": artifacts.machine_info(),
            "config": asdict(config), "sources": source_fingerprints(config),
            "records": merge_records(parts), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def source_fingerprints(config: BenchConfig) -> dict:
    from .models.loader import model_fingerprint, resolve_model

    out: dict[str, Any] = {"model": None, "adapter": "fresh" if config.adapter is None else None, "export": None}
    if config.model:
        out["model"] = model_fingerprint(resolve_model(config.model))
    if config.adapter:
        from .method.adapter import adapter_fingerprint

        out["adapter"] = adapter_fingerprint(config.adapter)
    if config.export:
        out["export"] = artifacts.fingerprint_dir(config.export, suffixes=(".onnx", ".data", ".json"))
    return out


# --- reporting ---------------------------------------------------------------------------------------------------


def write_json(result: dict, path: str | Path) -> Path:
    return artifacts.atomic_write_json(path, result)


def _fmt(value, spec: str = ".4g", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(result: dict):
    """A Rich table of the records (one row per backend and batch size); times in ms (p50 unless p90)."""
    from rich.table import Table

    machine, config = result["machine"], result["config"]
    t = Table(title=f"invdiff bench: {machine.get('gpu') or machine['cpu']} ({machine['cores']} cores), "
                    f"{config['steps']} steps, {config['precision']}, times in ms")
    for col in ("backend", "batch", "step", "step p90", "loop", "e2e", "img/s", "peak MB", "vs eager", "adapter"):
        t.add_column(col, justify="left" if col == "backend" else "right", no_wrap=True)
    for r in sorted(result["records"], key=lambda r: (r["batch_size"], BACKENDS.index(r["backend"]))):
        t.add_row(r["backend"], str(r["batch_size"]), _fmt(r["step_ms_p50"]), _fmt(r["step_ms_p90"]),
                  _fmt(r.get("loop_ms_p50")), _fmt(r.get("e2e_ms_p50")), _fmt(r["images_per_s"], ".3g"),
                  _fmt(r["peak_mem_mb"], ".0f"), _fmt(r["speedup_vs_eager"], ".2f", "x"),
                  _fmt(r["adapter_overhead"], ".2f", "x"))
    return t


def plot(result: dict, path: str | Path) -> Path:
    """Step latency (p50) and images/s vs batch size, one line per backend (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in BACKENDS:
        rows = sorted((r for r in result["records"] if r["backend"] == backend), key=lambda r: r["batch_size"])
        if rows:
            x = [r["batch_size"] for r in rows]
            ax_lat.plot(x, [r["step_ms_p50"] for r in rows], marker="o", label=backend)
            ax_tp.plot(x, [r["images_per_s"] or 0 for r in rows], marker="o", label=backend)
    ax_lat.set(xscale="log", yscale="log", xlabel="batch size", ylabel="denoising step p50 (ms)")
    ax_tp.set(xscale="log", xlabel="batch size", ylabel="images/s (end to end)")
    ax_lat.legend()
    fig.suptitle(result["machine"].get("gpu") or result["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    sys.exit(worker_main())
