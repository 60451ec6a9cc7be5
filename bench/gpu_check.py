"""Per-step latency of one CFG denoising step: diffusers-style eager vs invdiff-rt's fused fp16 step + CUDA graphs.

SD-1.5-architecture UNet with random weights (nothing downloaded) + a GuidanceAdapter sized to <= 5 % of the UNet,
64x64x4 latents, 77x768 text embeddings, batch 1/4/8 with classifier-free guidance (the UNet runs at 2B).

Variants (all time the same step: eps_c = eps_unet(c) + w * adapter(c) on both branches, out = u + s * (c - u)):
  eager_fp32    diffusers way in fp32: UNet call at 2B, adapter as a separate module call, CFG combine in Python
  eager_fp16    the same in fp16
  fused_fp16_graph  `FusedDenoiser` (UNet + adapter + CFG in one module) in fp16, one CUDA graph per batch shape
  compiled_fp16 `torch.compile(FusedDenoiser, mode="reduce-overhead")`, only when it builds within --compile-cap-s

Goal checked: fused_fp16_graph >= 1.8x faster than eager_fp16 at batch 1, and < 10 ms per step at batch 1 (H100).
`--device cpu --tiny` is a smoke path (tiny UNet, 1 repeat) that CI runs without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout, no install needed

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_TEXT = (77, 768)
TINY_TEXT = (8, 32)
ADAPTER_BUDGET = 0.05
GUIDANCE, ADAPTER_WEIGHT = 7.5, 1.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny UNet (smoke test)")
    p.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes (CFG doubles them)")
    p.add_argument("--latent-sizes", default=None,
                   help="comma-separated latent HxW, e.g. 64x64,64x96 (= 512x512 and 512x768 px; default: the UNet's)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10 on GPU, 1 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 50 on GPU, 1 with --tiny)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(mode='reduce-overhead')")
    p.add_argument("--compile-cap-s", type=float, default=150.0, help="give up on torch.compile after this long")
    p.add_argument("--out", default="bench/results/gpu_check.json", help="JSON results file")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 50)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible; use --device cpu --tiny for the smoke path")
    return args


# --- models ------------------------------------------------------------------------------------------------------


def build_unet(tiny: bool, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).eval().requires_grad_(False)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_adapter(unet, seed: int = 1):
    """The project's GuidanceAdapter sized for this UNet (<= 5 % of its params), with random (non-zero) weights."""
    from invdiff_rt.method.adapter import GuidanceAdapter, config_for_unet

    config = config_for_unet(unet)
    torch.manual_seed(seed)
    adapter = GuidanceAdapter(config)
    if count_params(adapter) > ADAPTER_BUDGET * count_params(unet):
        raise SystemExit(f"adapter has {count_params(adapter)} params, over {ADAPTER_BUDGET:.0%} of the UNet")
    _randomize(adapter, seed)
    return adapter.eval().requires_grad_(False)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Adapters start at zero output; give every parameter small random values so the timed work is real."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def latent_sizes(args) -> list[tuple[int, int]]:
    if not args.latent_sizes:
        size = TINY_UNET["sample_size"] if args.tiny else SD15_UNET["sample_size"]
        return [(size, size)]
    return [tuple(int(v) for v in s.lower().split("x")) for s in args.latent_sizes.split(",") if s.strip()]


def step_inputs(batch: int, tiny: bool, device: str, dtype: torch.dtype, seed: int = 0,
                hw: tuple[int, int] | None = None):
    """sample [B,4,h,w], timestep [B], text embeddings [2B,L,D] (cond then uncond), guidance [], adapter weight []."""
    size = TINY_UNET["sample_size"] if tiny else SD15_UNET["sample_size"]
    height, width = hw or (size, size)
    length, dim = TINY_TEXT if tiny else SD15_TEXT
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, height, width, generator=gen)
    timestep = torch.full((batch,), 500.0)
    text = torch.randn(2 * batch, length, dim, generator=gen)
    to = dict(device=device)
    return (sample.to(dtype=dtype, **to), timestep.to(**to), text.to(dtype=dtype, **to),
            torch.tensor(GUIDANCE, **to), torch.tensor(ADAPTER_WEIGHT, **to))


# --- the step variants --------------------------------------------------------------------------------------------


def eager_step(unet, adapter):
    """The diffusers way, same math as FusedDenoiser: UNet at 2B, adapter as a separate module call on both CFG
    branches, CFG combine in Python (in the model dtype)."""

    def step(sample, timestep, text, guidance, weight):
        batch = sample.shape[0]
        x2, t2 = torch.cat([sample, sample]), torch.cat([timestep, timestep])
        eps = unet(x2, t2, encoder_hidden_states=text).sample
        eps = eps + weight.to(eps.dtype) * adapter(x2, t2, text, eps)
        eps_cond, eps_uncond = eps[:batch], eps[batch:]
        return eps_uncond + guidance.to(eps.dtype) * (eps_cond - eps_uncond)

    return step


from invdiff_rt.runtime.cuda_graphs import graphed_step  # noqa: E402  (one home for the capture)


def fused_module(unet, adapter):
    from invdiff_rt.runtime.fused import FusedDenoiser

    return FusedDenoiser(unet, adapter=adapter, cfg=True).eval()


@contextmanager
def time_cap(seconds: float):
    """Raise TimeoutError when the body runs past `seconds` (SIGALRM: main thread, Linux)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"exceeded {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- timing ----------------------------------------------------------------------------------------------------------


def time_step(step, inputs, device: str, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call: CUDA events around each call after warm-up (no host sync inside the timed call)."""
    with torch.inference_mode():
        for _ in range(warmup):
            step(*inputs)
        if device == "cuda":
            torch.cuda.synchronize()
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
            for start, end in pairs:
                start.record()
                step(*inputs)
                end.record()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in pairs]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(*inputs)
            times.append((time.perf_counter() - t0) * 1e3)
        return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(variant: str, batch: int, times: list[float], **extra) -> dict:
    return {"variant": variant, "batch": batch, "p50_ms": percentile(times, 0.5), "p90_ms": percentile(times, 0.9),
            "min_ms": min(times), "n": len(times), **extra}


# --- the benchmark ---------------------------------------------------------------------------------------------------


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_batch(models: dict, batch: int, args, hw: tuple[int, int] | None = None) -> list[dict]:
    """Time every variant at one batch size (and latent size); record fused-vs-eager fp16 agreement."""
    rows, dev = [], args.device
    inputs32 = step_inputs(batch, args.tiny, dev, torch.float32, hw=hw)
    inputs16 = step_inputs(batch, args.tiny, dev, models["dtype16"], hw=hw)
    rows.append(summarize("eager_fp32", batch, time_step(models["eager32"], inputs32, dev, args.warmup, args.repeats)))
    eager16 = models["eager16"]
    rows.append(summarize("eager_fp16", batch, time_step(eager16, inputs16, dev, args.warmup, args.repeats)))
    with torch.inference_mode():
        fused = graphed_step(models["fused16"], inputs16) if dev == "cuda" else models["fused16"]
        reference = eager16(*inputs16)
        diff = max_abs_diff(fused(*inputs16), reference) / max(reference.float().abs().max().item(), 1e-12)
    name = "fused_fp16_graph" if dev == "cuda" else "fused_fp16"
    rows.append(summarize(name, batch, time_step(fused, inputs16, dev, args.warmup, args.repeats),
                          rel_diff_vs_eager_fp16=diff))
    latent = "x".join(map(str, inputs16[0].shape[-2:]))
    return [{**r, "latent": latent} for r in rows]


def run_compiled(compiled, inputs, batch: int, args) -> dict:
    start = time.perf_counter()
    try:
        with time_cap(args.compile_cap_s), torch.inference_mode():
            for _ in range(3):
                compiled(*inputs)
    except Exception as e:  # compile failure or time cap: report it, keep the other numbers
        return {"variant": "compiled_fp16", "batch": batch, "skipped": f"{type(e).__name__}: {e}"[:200]}
    build_s = time.perf_counter() - start
    return summarize("compiled_fp16", batch, time_step(compiled, inputs, args.device, args.warmup, args.repeats),
                     compile_s=build_s)


def build_models(args) -> dict:
    dtype16 = torch.float16 if args.device == "cuda" else torch.bfloat16  # CPU has no fast fp16 conv
    unet32 = build_unet(args.tiny)
    adapter32 = build_adapter(unet32)
    unet16 = copy.deepcopy(unet32).to(args.device, dtype16)  # same weights, half precision
    adapter16 = copy.deepcopy(adapter32).to(args.device, dtype16)
    unet32, adapter32 = unet32.to(args.device), adapter32.to(args.device)
    fused16 = fused_module(unet16, adapter16)
    compiled = None
    if args.compile:
        compiled = torch.compile(fused_module(unet16, adapter16), mode="reduce-overhead", fullgraph=False)
    return {"eager32": eager_step(unet32, adapter32), "eager16": eager_step(unet16, adapter16), "fused16": fused16,
            "compiled": compiled, "dtype16": dtype16,
            "params": {"unet": count_params(unet32), "adapter": count_params(adapter32)}}


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _nvidia_smi("driver_version")
        info["clocks_sm_mhz"] = _nvidia_smi("clocks.sm")
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def goals(rows: list[dict], device: str) -> dict:
    """Speed-up of the fused step over eager fp16 at the smallest batch, and its absolute latency."""
    fused_name = "fused_fp16_graph" if device == "cuda" else "fused_fp16"
    batch = min(r["batch"] for r in rows)
    first = rows[0].get("latent")  # goals at the first latent size
    by = {r["variant"]: r for r in rows if r["batch"] == batch and "p50_ms" in r and r.get("latent") == first}
    speedup = by["eager_fp16"]["p50_ms"] / by[fused_name]["p50_ms"]
    out = {"batch": batch, "speedup_vs_eager_fp16": speedup, "fused_p50_ms": by[fused_name]["p50_ms"]}
    if device == "cuda":
        out["speedup_ok (>=1.8x)"] = speedup >= 1.8
        out["latency_ok (<10 ms)"] = by[fused_name]["p50_ms"] < 10.0
    return out


def print_table(rows: list[dict]) -> None:
    header = f"{'variant latent':<24}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'ms/sample':>11}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "p50_ms" not in r:
            print(f"{r['variant']:<24}{r['batch']:>6}{'-':>10}{'-':>10}{'-':>11}  {r.get('skipped', '')}")
            continue
        note = f"max|fused-eager16|/max|eager16|={r['rel_diff_vs_eager_fp16']:.1e}" if "rel_diff_vs_eager_fp16" in r else ""
        note = note or (f"compile {r['compile_s']:.0f} s" if "compile_s" in r else "")
        print(f"{r['variant'] + ' ' + r.get('latent', ''):<24}{r['batch']:>6}{r['p50_ms']:>10.2f}{r['p90_ms']:>10.2f}"
              f"{r['p50_ms'] / r['batch']:>11.2f}  {note}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(1)  # smoke path on shared CI cores: oversubscribed threads are 10-50x slower
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    models = build_models(args)
    result = {"machine": machine(args.device), "params": models["params"],
              "adapter_fraction": models["params"]["adapter"] / models["params"]["unet"],
              "config": {"tiny": args.tiny, "batches": args.batches, "warmup": args.warmup, "repeats": args.repeats,
                         "half_dtype": str(models["dtype16"]).replace("torch.", ""), "guidance_scale": GUIDANCE,
                         "adapter_weight": ADAPTER_WEIGHT, "cfg": True,
                         "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                  "cudnn": torch.backends.cudnn.allow_tf32}},
              "results": []}
    for hw in latent_sizes(args):
        for batch in args.batches:  # results are saved after every batch: a run stopped by the time cap keeps them
            result["results"] += run_batch(models, batch, args, hw)
            save(result, args)
    if models["compiled"] is not None:
        inputs16 = step_inputs(args.batches[0], args.tiny, args.device, models["dtype16"])
        result["results"].append(run_compiled(models["compiled"], inputs16, args.batches[0], args))
        save(result, args)
    print_table(result["results"])
    print(json.dumps(result["goals"], indent=2))
    print(f"wrote {args.out}")
    return result


def save(result: dict, args) -> None:
    from invdiff_rt.artifacts import atomic_write_json

    result["goals"] = goals(result["results"], args.device)
    result["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
