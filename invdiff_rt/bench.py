"""`invdiff bench`: per-stage latency, throughput and peak memory of each backend, side by side with the
diffusers-style `eager` baseline, with the base model without adapter, and with the peers a CPU user would pick
instead (`--peers`, see `invdiff_rt.peers`).

Every contender runs in its own persistent process (`python -m invdiff_rt.bench --serve JOB`), so thread pools of
different runtimes never fight and each peak-memory number belongs to one backend. The contenders are timed in
interleaved rounds (`invdiff_rt.interleave`): in every round each one times its stages and its end-to-end images, in
turn; every ratio (to eager, to the best peer, adapter over base) is taken within a round and reported as the median
over rounds with its min-max spread. Inside a worker the backend with and without the adapter are also timed call
by call, interleaved (the adapter overhead), so load from other processes hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import artifacts
from .errors import InvdiffError
from .interleave import round_ratios, spread
from .runtime.defaults import DEFAULT_GUIDANCE

FORMAT = "invdiff-rt/bench"
FORMAT_VERSION = 2  # 2: interleaved rounds, e2e spreads, peers
BACKENDS = ("eager", "torch", "onnxruntime", "openvino", "tensorrt")
ENGINE_BACKENDS = ("onnxruntime", "openvino", "tensorrt")  # run from an ONNX export folder
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


def peak_device_mb(backend: str) -> float | None:
    """torch's allocator peak on the GPU: the whole story for the torch backends only (TensorRT's engine memory and
    ONNX Runtime's arena are allocated outside it), so None for the others."""
    import torch

    if backend not in ("eager", "torch") or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# --- the baseline -------------------------------------------------------------------------------------------------


class EagerRuntime:
    """The diffusers way: PyTorch eager UNet called at 2B, the adapter as a separate module call (skipped at the
    steps where its weight is 0, as a hand-written loop would), the CFG combine in Python with `chunk`; driven by
    the same diffusers scheduler loop as every backend."""

    name = "eager"
    cfg = True

    def __init__(self, model, adapter=None):
        self.model = model
        self.unet = model.unet
        self.adapter = adapter
        self.adapter_from_t = getattr(adapter, "from_t", None)  # sampling.step_weight
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
            if self.adapter is not None and adapter_weight != 0:
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
    rounds: int = 5  # interleaved rounds (every stage is timed `repeats` times per round)
    peers: list[str] = field(default_factory=list)  # invdiff_rt.peers.PEERS names
    peers_python: str | None = None  # interpreter for the peer workers (a venv with the [peers] extra)
    eager: bool = True  # time the diffusers-style eager baseline too (--no-eager: peers-only comparisons)

    def check(self) -> "BenchConfig":
        """Refuse bad flags before anything runs (one-line errors)."""
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise InvdiffError(f"--backends: unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvdiffError("--batch-sizes: pass positive integers, e.g. --batch-sizes 1,8,32")
        for flag, value, low in (("--steps", self.steps, 1), ("--repeats", self.repeats, 1),
                                 ("--warmup", self.warmup, 0), ("--rounds", self.rounds, 1)):
            if value < low:
                raise InvdiffError(f"{flag} {value}: must be at least {low}")
        if self.threads is not None and self.threads < 1:
            raise InvdiffError(f"--threads {self.threads}: must be at least 1 (or leave it out)")
        from .runtime.sampling import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise InvdiffError(f"--scheduler {self.scheduler}: unknown; choose one of {', '.join(SCHEDULERS)}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise InvdiffError(f"--precision {self.precision}: choose fp32, fp16 or bf16 (openvino)")
        if self.precision == "bf16" and set(self.backends) != {"openvino"}:
            raise InvdiffError("--precision bf16: only the openvino backend runs bf16 (on fp32 exports); pass "
                               "--backends openvino")
        from .peers import PEERS

        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise InvdiffError(f"--peers: unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
        if self.peers and self.guidance_scale <= 1:  # diffusers' pipelines then drop the unconditional half
            raise InvdiffError(f"--guidance-scale {self.guidance_scale:g}: the peers' pipelines turn classifier-free "
                               "guidance off at 1 or less (half our UNet batch); pass a scale above 1 to compare")
        if self.model is None and self.export is None:
            raise InvdiffError("--model/--export: pass a model folder (with optional --adapter) or an export folder")
        self._check_used()
        return self

    def _check_used(self) -> None:
        """Flags that would not act are refused rather than recorded."""
        if not self.eager and "eager" in self.backends:
            raise InvdiffError("--no-eager: --backends names eager; drop one of them")
        if self.peers_python and not self.peers:
            raise InvdiffError("--peers-python: no --peers to run with it; pass --peers optimum-ort,openvino or drop it")
        if self.base_export and not any(b in ENGINE_BACKENDS for b in self.backends):
            raise InvdiffError(f"--base-export: only the engine backends ({', '.join(ENGINE_BACKENDS)}) time it; add "
                               "one to --backends or drop it")

    @property
    def export_precision(self) -> str:
        """The precision of the exports timed: bf16 is the openvino backend's compile option on an fp32 export."""
        return "fp32" if self.precision == "bf16" else self.precision

    @property
    def run_backends(self) -> list[str]:
        """`eager` first (unless --no-eager), then the requested backends, each once."""
        return list(dict.fromkeys(["eager"] * self.eager + list(self.backends)))


def parse_list(text: str, flag: str, cast: Callable[[str], Any] = str) -> list:
    """'1,8, 32' -> [1, 8, 32]; one-line error naming the flag on a bad item."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        values = [cast(s) for s in items]
    except ValueError:
        raise InvdiffError(f"{flag} {text}: not a comma-separated list of {cast.__name__}") from None
    if len(set(values)) < len(values):  # a repeat would be timed twice a round, its spread over 2x the rounds
        raise InvdiffError(f"{flag} {text}: names {next(v for v in values if values.count(v) > 1)} twice; "
                           "list each once")
    return values


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


def job_precision(job: Job) -> str:
    """The precision a job's rows really run: an engine backend the export's (bf16: openvino's compile option on
    an fp32 export), eager and torch fp16 only on a CUDA device (fp32 on a CPU whatever --precision says)."""
    import torch

    if job.backend in ENGINE_BACKENDS:
        return job.config["precision"]
    return "fp16" if job_device(job.config["precision"])[1] == torch.float16 else "fp32"


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


STEP_CALLS = 5  # timed calls per side of a step pair, their median taken: one 1-10 ms call is at the VM's mercy


def paired_steps(runtime, base, batch: int, cfg: dict, sync: Callable[[], None]) -> dict:
    """The denoising step with and without the adapter, interleaved pair by pair (the order alternates), so that
    any load on the machine hits both alike; each side of a pair is the median of STEP_CALLS calls, and `overhead`
    = median of the per-pair time ratios. The timed calls follow one untimed call of the same runtime: switching
    runtimes has its own cost (the other runtime's thread pool still spinning, cold caches) that belongs to
    neither. (Runs 1-26 in bench/README.md timed one call per side.)"""
    with_adapter, without = stage_calls(runtime, batch, cfg)["step"], stage_calls(base, batch, cfg)["step"]
    for _ in range(cfg["warmup"]):
        with_adapter(), without()
    times: dict[str, list[float]] = {"adapter": [], "base": []}
    for i in range(cfg["repeats"]):
        pair = (("adapter", with_adapter), ("base", without))
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            times[name].append(float(np.median(time_calls(fn, 1, STEP_CALLS, sync))))
    ratios = np.asarray(times["adapter"]) / np.asarray(times["base"])
    return {"adapter": summarize(times["adapter"]), "base": summarize(times["base"]),
            "overhead": float(np.median(ratios))}


class BackendServer:
    """A worker's state: one backend loaded with the adapter and without it (`job.base`), timed once per request.

    Each `measure(batch)` is one round for that batch: every stage `repeats` times (`warmup` untimed calls the first
    time a batch is seen), the end-to-end image with and without the adapter alternately, and the paired steps."""

    def __init__(self, job: Job):
        import torch

        self.job, self.cfg = job, job.config
        if self.cfg["threads"]:
            torch.set_num_threads(self.cfg["threads"])
        self.runtime = load_job_runtime(job)
        self.peaks = self.own_peaks() if job.base else {}
        self.base = load_job_runtime(replace(job, base=None, **job.base)) if job.base else None
        if self.base is not None:  # as warm as the adapter runtime (with --warmup 0 too)
            for batch in sorted(self.cfg["batch_sizes"]):
                self.one_image(self.base, batch)
        self.sync = synchronizer(getattr(self.runtime, "device", "cpu"))
        self.seen: set[int] = set()

    def hello(self) -> dict:
        return {"backend": self.job.backend, "torch_threads": _torch_threads(), "precision": job_precision(self.job)}

    def own_peaks(self) -> dict[int, tuple]:
        """{batch: (host MB, device MB)} peaks of the adapter runtime alone, read after one end-to-end image per
        batch size (ascending) and before the no-adapter runtime loads, which would count a second model."""
        peaks = {}
        for batch in sorted(self.cfg["batch_sizes"]):
            self.one_image(self.runtime, batch)
            peaks[batch] = (peak_host_mb(), peak_device_mb(self.job.backend))
        return peaks

    def one_image(self, runtime, batch: int) -> None:
        """One untimed end-to-end image of `batch` rows."""
        import torch

        with torch.inference_mode():
            stage_calls(runtime, batch, self.cfg)["e2e"]()

    def measure(self, batch: int) -> dict:
        import torch

        cfg, first = self.cfg, batch not in self.seen
        self.seen.add(batch)
        with torch.inference_mode():
            calls = stage_calls(self.runtime, batch, cfg)
            stages, out = {}, {}
            if self.base is not None:  # its adapter half is the e2e stage
                out["e2e_pair"] = self.e2e_pair(calls["e2e"], stage_calls(self.base, batch, cfg)["e2e"], first)
                out["paired"] = paired_steps(self.runtime, self.base, batch, cfg, self.sync)
                stages["e2e"] = out["e2e_pair"]["adapter"]
            for stage in (s for s in self.job.stages if s not in stages):
                warmup = cfg["warmup"] if stage in ("text", "step", "decode") else min(cfg["warmup"], 1)
                stages[stage] = time_calls(calls[stage], warmup if first else 0, cfg["repeats"], self.sync)
            host, device = self.peaks.get(batch) or (peak_host_mb(), peak_device_mb(self.job.backend))
            out.update(stages=stages, peak_host_mb=host, peak_device_mb=device)
        return out

    def e2e_pair(self, with_adapter, without, first: bool) -> dict:
        """End-to-end images with and without the adapter, alternating call by call (order flips every pair)."""
        if first:
            for fn in (with_adapter, without):
                time_calls(fn, min(self.cfg["warmup"], 1), 0, self.sync)
        times: dict[str, list[float]] = {"adapter": [], "base": []}
        pair = (("adapter", with_adapter), ("base", without))
        for i in range(self.cfg["repeats"]):
            for name, fn in pair if i % 2 else pair[::-1]:
                times[name] += time_calls(fn, 0, 1, self.sync)
        return times

    def handle(self, request: dict) -> dict:
        return self.measure(int(request["batch"]))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def job_server(job_data: dict):
    """(hello, handle) of the worker for a job JSON: one of our backends, or a peer pipeline."""
    if job_data.get("peer"):
        from .peers import PeerServer

        server = PeerServer(job_data)
    else:
        server = BackendServer(Job.from_json(job_data))
    return server.hello, server.handle


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a persistent worker process: load the job, then answer the driver's requests."""
    from .interleave import serve

    parser = argparse.ArgumentParser(prog="python -m invdiff_rt.bench")
    parser.add_argument("--serve", required=True, help="job JSON written by `invdiff bench`")
    args = parser.parse_args(argv)
    job_data = artifacts.read_json(args.serve, "bench job")
    state: dict = {}

    def hello() -> dict:
        state["hello"], state["handle"] = job_server(job_data)
        return state["hello"]()

    return serve(hello, lambda request: state["handle"](request))


# --- orchestration ---------------------------------------------------------------------------------------------------


def start_worker(name: str, job_data: dict, workdir: Path, python: str | None, isolate: bool):
    """A persistent contender: its own process (`python`, default this interpreter); our backends may run
    in-process instead (`isolate=False`, tests). Peers always get their own process."""
    from .interleave import LocalWorker, ProcessWorker

    if not isolate and not job_data.get("peer"):
        server = BackendServer(Job.from_json(job_data))
        return LocalWorker(name, server.hello, server.handle)
    job_path = workdir / f"{name}.job.json"
    artifacts.atomic_write_json(job_path, job_data)
    argv = [python or sys.executable, "-m", "invdiff_rt.bench", "--serve", str(job_path)]
    fix = f"; --peers-python {python}: a venv with invdiff-rt and its [peers] extra (`make peers-venv`)" \
        if python else ""
    return ProcessWorker(name, argv, workdir / f"{name}.log", fix)


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

    return export_model(model_dir, out_dir, adapter_dir=adapter_dir, precision=config.export_precision,
                        max_batch=max(config.batch_sizes), components=components,
                        sizes=requested_sizes(model_dir, config))


def requested_sizes(model_dir: str, config: BenchConfig) -> tuple | None:
    """--height/--width as a one-size range for an export (None: the model's own size, a static export)."""
    if not config.latent_shape:
        return None
    from .models.loader import resolve_model
    from .runtime.resolution import limits_of_model_dir

    size = tuple(d * limits_of_model_dir(resolve_model(model_dir)).downsample for d in config.latent_shape[1:])
    return (size, size, size)


# the base variant: every part (its step is paired with the adapter's, and so is its end-to-end image)
BASE_PARTS = ("denoiser", "text_encoder", "vae_decoder")


def check_base_export(base_export: str, adapter_export: str, config: BenchConfig) -> str:
    """`--base-export`: an export of the same base model, without adapter, holding the parts the pair needs, at the
    bench's precision and batch range; one-line errors otherwise."""
    from .export.manifest import read_manifest

    flag = f"--base-export {base_export}"
    if not Path(base_export).is_dir():
        raise InvdiffError(f"{flag}: not an export folder; run `invdiff export --model MODEL` without --adapter")
    base, with_adapter = read_manifest(base_export, flag="--base-export"), read_manifest(adapter_export, verify=False)
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
    check_export_fits(flag, base, config, f"re-export with --precision {config.export_precision} --max-batch "
                                          f"{max(config.batch_sizes)}")
    return str(base_export)


def check_export_fits(flag: str, manifest: dict, config: BenchConfig, fix: str) -> None:
    """An export the bench times holds its precision, batch sizes and --height/--width."""
    precision, batch = manifest.get("precision"), manifest.get("max_batch", 0)
    if precision != config.export_precision or batch < max(config.batch_sizes):
        raise InvdiffError(f"{flag}: exported at {precision} up to batch {batch}, the bench asks for "
                           f"{config.export_precision} up to batch {max(config.batch_sizes)}; {fix}")
    if config.latent_shape:
        from .runtime.resolution import check_size, limits_of_manifest

        limits = replace(limits_of_manifest(manifest), source=flag)
        check_size(limits, *(d * limits.downsample for d in config.latent_shape[1:]))


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
    if not manifest.get("cfg", True):
        raise InvdiffError(f"--export {config.export}: exported with --no-cfg (one UNet half a step), while the eager, "
                           "torch and peer rows sample with guidance; export without --no-cfg")
    if any(b in ENGINE_BACKENDS for b in config.run_backends):  # eager and torch do not run its graphs
        check_export_fits(f"--export {config.export}", manifest, config, f"bench it with --precision "
                          f"{manifest.get('precision')} and --batch-sizes up to {manifest.get('max_batch')}, or "
                          "re-export")
    model = config.model or manifest.get("base_model")
    if model and not (Path(model) / "model_index.json").exists():  # a built-in name
        try:
            model = str(resolve_model(model))
        except InvdiffError:
            pass
    if not (model and (Path(model) / "model_index.json").exists()):
        raise InvdiffError(f"--export {config.export}: its base model {model!r} is not on this machine; pass "
                           "--model MODEL_DIR (the eager baseline needs it)")
    adapter = config.adapter or recorded.get("source")
    if not (adapter and Path(adapter).is_dir()):
        raise InvdiffError(f"--export {config.export}: its adapter folder {adapter!r} is not on this machine; "
                           "pass --adapter ADAPTER_DIR")
    return model, adapter


def checked_sources(config: BenchConfig, tmp: Path) -> tuple[tuple[str, str], dict]:
    """`resolve_sources`' (model, adapter) and their `source_fingerprints`, hashed once: with `--export`, checked
    against the ones it was made from."""
    from .export.manifest import read_manifest

    sources = resolve_sources(config, tmp)
    fingerprints = source_fingerprints(config, *sources)
    if config.export is not None:
        check_own_sources(config, read_manifest(config.export, verify=False), sources, fingerprints)
    return sources, fingerprints


def check_own_sources(config: BenchConfig, manifest: dict, sources: tuple[str, str], fingerprints: dict) -> None:
    """The model and adapter eager and torch will time (`--model`/`--adapter`, else the ones the export records)
    are the ones `--export` was made from, which the engine backends time."""
    from .models.loader import matches_model

    model, adapter = sources
    if fingerprints["adapter"] != manifest["adapter"].get("fingerprint"):
        raise InvdiffError(f"--adapter {adapter}: not the adapter --export {config.export} was made with; leave "
                           "--adapter out (the export's own is used) or re-export with it" if config.adapter else
                           f"--export {config.export}: its adapter {adapter} changed since the export; re-export")
    if not matches_model(manifest.get("base_fingerprint"), Path(model), fingerprints["model"]):
        raise InvdiffError(f"--model {config.model}: not the model --export {config.export} was made from; pass "
                           "that model or re-export" if config.model else
                           f"--export {config.export}: its base model {model} changed since the export; re-export")


def build_engines(export_dirs, engines_dir: str, log: Callable[[str], None]) -> None:
    """Build (or reuse from the cache) the TensorRT engines of each export folder."""
    from .export import tensorrt as trt_export

    trt_export.require_tensorrt("invdiff bench --backends tensorrt")
    for export_dir in export_dirs:
        for name, plan, reused in trt_export.build_export(export_dir, engines_dir, trt_export.BuildOptions()):
            log(f"tensorrt {name}: {'cached' if reused else 'built'} {plan}")


def plan_jobs(config: BenchConfig, tmp: Path, log: Callable[[str], None],
              sources: tuple[str, str] | None = None) -> list[Job]:
    """One job per backend (with its base variant); exports what the engine backends need into `tmp`. `sources`:
    `resolve_sources`' (model, adapter) when already resolved."""
    model, adapter = sources or checked_sources(config, tmp)[0]
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
            source = {"export": exports["adapter"], "engines": config.engines, "model": model}  # model: for peers
            base = {"export": exports["base"]}
        else:
            source, base = {"model": model, "adapter": adapter}, {"adapter": None}
        jobs.append(Job(backend, asdict(config), base=base, **source))
    return jobs


def peer_jobs(config: BenchConfig, model: str, tmp: Path) -> dict[str, dict]:
    """{worker name `peer:NAME`: job}: the same model folder, steps, CFG scale, scheduler and batch sizes."""
    from .models.loader import resolve_model

    folder = str(Path(resolve_model(model)).resolve())
    return {f"peer:{name}": {"peer": name, "model": folder, "work_dir": str(tmp), "config": asdict(config)}
            for name in config.peers}


def e2e_rounds(rounds: list[dict], key: str = "adapter") -> list[float]:
    """Per-round median end-to-end ms: `adapter` (the e2e stage, or the alternating pair), `base`, or a peer's."""
    if key == "base":
        return [float(np.median(r["e2e_pair"]["base"])) for r in rounds]
    return [float(np.median(r["e2e"] if "e2e" in r else r["stages"]["e2e"])) for r in rounds]


def merge_records(results: dict[str, dict[int, list[dict]]], kinds: dict[str, str]) -> tuple[list, list]:
    """(our records, peer records): one per (contender, batch size), with per-round ratios to `eager`, to the
    base model on the same backend and to the best peer (median and min-max over rounds)."""
    peers = [make_peer_record(name, batch, rounds, kinds[name]) for name, by in results.items()
             if kinds[name] != "backend" for batch, rounds in by.items()]
    records = []
    for name, by in results.items():
        if kinds[name] == "backend":
            for batch, rounds in by.items():
                eager = results.get("eager", {}).get(batch)
                at_batch = [p for p in peers if p["batch_size"] == batch]
                records.append(make_record(name, batch, rounds, eager, at_batch,
                                           {p["peer"]: results[p["backend"]][batch] for p in at_batch}))
    return records, peers


def make_peer_record(name: str, batch: int, rounds: list[dict], hello_json: str) -> dict:
    hello = json.loads(hello_json)
    per_round = e2e_rounds(rounds)
    e2e = spread(per_round)
    return {"peer": hello.get("peer", name.removeprefix("peer:")), "backend": name, "batch_size": batch,
            "e2e_ms_p50": e2e["median"],
            "e2e_ms_rounds": per_round, "e2e_spread": e2e, "per_image_ms_p50": e2e["median"] / batch,
            "images_per_s": batch / (e2e["median"] / 1e3), "peak_mem_mb": max(r["peak_host_mb"] for r in rounds),
            "versions": hello.get("versions", {}), "settings": hello.get("settings", {})}


def make_record(backend: str, batch: int, rounds: list[dict], eager: list[dict] | None, peers: list[dict],
                peer_rounds: dict[str, list[dict]]) -> dict:
    stages = {stage: summarize([t for r in rounds for t in r["stages"][stage]]) for stage in rounds[0]["stages"]}
    out: dict[str, Any] = {"backend": backend, "batch_size": batch}
    for stage, s in stages.items():
        out[f"{stage}_ms_p50"], out[f"{stage}_ms_p90"] = s["p50"], s["p90"]
    ours = e2e_rounds(rounds)
    out["e2e_ms_rounds"] = ours
    out["e2e_ms_p50"] = float(np.median(ours))  # median of per-round medians
    out["per_image_ms_p50"] = out["e2e_ms_p50"] / batch
    out["images_per_s"] = batch / (out["e2e_ms_p50"] / 1e3)
    out["peak_mem_mb"] = max(r["peak_host_mb"] for r in rounds)
    out["peak_device_mb"] = rounds[-1]["peak_device_mb"]
    step = [float(np.median(r["stages"]["step"])) for r in rounds]
    out["speedup_vs_eager"] = _median_ratio([float(np.median(r["stages"]["step"])) for r in eager], step) \
        if eager else None
    out["e2e_speedup_vs_eager"] = round_ratios(e2e_rounds(eager), ours) if eager else None
    out.update(adapter_fields(rounds))
    out.update(peer_fields(ours, rounds, peers, peer_rounds))
    out["stages"] = stages
    return out


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return round_ratios(numerators, denominators)["median"]


def adapter_fields(rounds: list[dict]) -> dict:
    """Adapter overhead over rounds: per step (paired calls) and per image end to end (alternating calls)."""
    if "paired" not in rounds[0]:
        return {"base_step_ms_p50": None, "adapter_overhead": None, "adapter_overhead_spread": None,
                "base_e2e_ms_p50": None, "e2e_adapter_overhead": None}
    step = spread([r["paired"]["overhead"] for r in rounds])
    base = e2e_rounds(rounds, "base")
    with_adapter = [float(np.median(r["e2e_pair"]["adapter"])) for r in rounds]
    return {"base_step_ms_p50": float(np.median([r["paired"]["base"]["p50"] for r in rounds])),
            "adapter_overhead": step["median"], "adapter_overhead_spread": step,
            "base_e2e_ms_p50": float(np.median(base)), "base_e2e_ms_rounds": base,
            "e2e_adapter_overhead": round_ratios(with_adapter, base), "paired_rounds": [r["paired"] for r in rounds]}


def peer_fields(ours: list[float], rounds: list[dict], peers: list[dict], peer_rounds: dict) -> dict:
    """Speed-up over the best peer (lowest median e2e at this batch), per round: with the adapter and without."""
    if not peers:
        return {"best_peer": None, "vs_best_peer": None, "base_vs_best_peer": None}
    best = min(peers, key=lambda p: p["e2e_ms_p50"])
    theirs = e2e_rounds(peer_rounds[best["peer"]])
    base = round_ratios(theirs, e2e_rounds(rounds, "base")) if "e2e_pair" in rounds[0] else None
    return {"best_peer": best["peer"], "vs_best_peer": round_ratios(theirs, ours), "base_vs_best_peer": base}


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda s: None, isolate: bool = True) -> dict:
    """Start one persistent worker per contender (in its own process unless `isolate` is False), time them in
    interleaved rounds, and return the result (records, peer records, machine, config)."""
    from .interleave import run_rounds

    config.check()
    with tempfile.TemporaryDirectory(prefix="invdiff-bench-") as tmp:
        sources, fingerprints = checked_sources(config, Path(tmp))
        jobs = plan_jobs(config, Path(tmp), log, sources)
        specs = {job.backend: (asdict(job), None) for job in jobs}
        model = next(j.model for j in jobs if j.model)
        specs.update({n: (j, config.peers_python) for n, j in peer_jobs(config, model, Path(tmp)).items()})
        workers = {name: start_worker(name, data, Path(tmp), python, isolate) for name, (data, python) in specs.items()}
        try:
            kinds = start_all(workers, log)
            results = run_rounds({n: w for n, w in workers.items() if n in kinds}, config.batch_sizes,
                                 config.rounds, log)
        finally:
            for worker in workers.values():
                worker.close()
    records, peers = merge_records(results, kinds)
    for record in records:  # what each row ran: --precision fp16 leaves a CPU's eager and torch rows at fp32
        record["precision"] = workers[record["backend"]].hello.get("precision")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "machine": artifacts.machine_info(),
            "config": asdict(config), "sources": fingerprints, "records": records,
            "peers": peers,
            "skipped_peers": {n: w.hello["skip"] for n, w in workers.items() if w.hello and "skip" in w.hello},
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def start_all(workers: dict, log: Callable[[str], None]) -> dict[str, str]:
    """Wait for every worker's hello; -> {name: "backend" or the peer's hello JSON}; skipped peers are left out
    (one printed line each)."""
    kinds = {}
    for name, worker in workers.items():
        hello = worker.start()
        if "skip" in hello:
            log(hello["skip"])
            continue
        kinds[name] = json.dumps(hello) if "peer" in hello else "backend"
        log(f"{name}: ready")
    return kinds


def source_fingerprints(config: BenchConfig, model: str | None, adapter: str | None) -> dict:
    """What was timed (`resolve_sources`' model and adapter: with --export alone, the ones it records), hashed."""
    from .method.adapter import adapter_fingerprint
    from .models.loader import model_fingerprint, resolve_model

    fresh = config.adapter is None and config.export is None
    out: dict[str, Any] = {"model": model_fingerprint(resolve_model(model)) if model else None,
                           "adapter": "fresh" if fresh else adapter_fingerprint(adapter), "export": None}
    if config.export:
        out["export"] = artifacts.fingerprint_dir(config.export, suffixes=(".onnx", ".data", ".json"))
    return out


# --- reporting ---------------------------------------------------------------------------------------------------


def write_json(result: dict, path: str | Path) -> Path:
    return artifacts.atomic_write_json(path, result)


def _fmt(value, spec: str = ".4g", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _spread(s: dict | None) -> str:
    return "-" if not s else f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"


def table(result: dict):
    """A Rich table: one row per backend/peer and batch size; per-image end-to-end ms (median over rounds), ratios
    as median [min-max] over rounds."""
    from rich.table import Table

    machine, config = result["machine"], result["config"]
    t = Table(title=f"invdiff bench: {machine.get('gpu') or machine['cpu']} ({machine['cores']} cores), "
                    f"{config['steps']} steps, {config['precision']}, {config['rounds']} interleaved rounds")
    for col in ("backend", "batch", "step ms", "ms/image", "img/s", "peak MB", "vs eager", "vs best peer",
                "base vs best peer", "adapter (step)", "adapter (e2e)"):
        t.add_column(col, justify="left" if col == "backend" else "right", no_wrap=True)
    rows = sorted(result["records"] + result.get("peers", []), key=lambda r: (r["batch_size"], _order(r)))
    for r in rows:
        ours = "peer" not in r
        t.add_row(_backend_label(r, config["precision"]), str(r["batch_size"]), _fmt(r.get("step_ms_p50")),
                  _fmt(r["e2e_ms_p50"] / r["batch_size"]), _fmt(r["images_per_s"], ".3g"),
                  _fmt(r["peak_mem_mb"], ".0f"), _spread(r.get("e2e_speedup_vs_eager")) if ours else "-",
                  _spread(r.get("vs_best_peer")), _spread(r.get("base_vs_best_peer")),
                  _spread(r.get("adapter_overhead_spread")), _spread(r.get("e2e_adapter_overhead")))
    return t


def _backend_label(record: dict, precision: str) -> str:
    """The row's backend, with its precision where it ran another than the title's."""
    ran = record.get("precision")
    return record["backend"] if ran in (None, precision) else f"{record['backend']} ({ran})"


def _order(record: dict) -> int:
    return BACKENDS.index(record["backend"]) if record["backend"] in BACKENDS else len(BACKENDS)


def plot(result: dict, path: str | Path) -> Path:
    """Step latency (p50) and images/s vs batch size, one line per backend (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(10, 4))
    records = result["records"] + result.get("peers", [])
    for backend in dict.fromkeys(r["backend"] for r in records):
        rows = sorted((r for r in records if r["backend"] == backend), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rows]
        if "step_ms_p50" in rows[0]:
            ax_lat.plot(x, [r["step_ms_p50"] for r in rows], marker="o", label=backend)
        ax_tp.plot(x, [r["images_per_s"] or 0 for r in rows], marker="o", label=backend)
    ax_lat.set(xscale="log", yscale="log", xlabel="batch size", ylabel="denoising step p50 (ms)")
    ax_tp.set(xscale="log", xlabel="batch size", ylabel="images/s (end to end)")
    ax_lat.legend()
    ax_tp.legend(fontsize=7)
    fig.suptitle(result["machine"].get("gpu") or result["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    sys.exit(worker_main())
