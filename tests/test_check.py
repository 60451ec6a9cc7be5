"""Backend registry and `invdiff check`: torch vs ONNX Runtime parity on the shared sampling loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import PROMPTS, exported_folder
from typer.testing import CliRunner

from invdiff_rt.artifacts import read_jsonl
from invdiff_rt.errors import InvdiffError
from invdiff_rt.runtime import backends
from invdiff_rt.runtime import generate as gen
from invdiff_rt.runtime.check import THRESHOLDS, metrics


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_folder(tmp_path_factory)


def test_metrics_hand_computed():
    max_abs, rel = metrics(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 4.0]))
    assert max_abs == 2.0 and rel == pytest.approx(2.0 / 21**0.5)
    assert THRESHOLDS["fp32"]["noise_pred"] == 1e-4


CPU_HOST = {"openvino", "onnxruntime", "torch"}  # what a CPU machine with the default install has


@pytest.fixture
def cpu_host(monkeypatch):
    monkeypatch.setattr(backends, "is_available", lambda name: name in CPU_HOST)


def test_resolve_backend_prefers_fastest_available(cpu_host, monkeypatch):
    assert backends.resolve_backend("auto") == "openvino"
    assert backends.resolve_backend("auto", export_dir="x") == "openvino"  # measured fastest on CPU
    assert backends.resolve_backend("auto", model=object()) == "torch"
    assert backends.resolve_backend("onnxruntime") == "onnxruntime"
    monkeypatch.setattr(backends, "is_available", lambda name: name in CPU_HOST | {"torch-cuda", "tensorrt"})
    assert backends.resolve_backend("auto", export_dir="x") == "tensorrt"
    assert backends.resolve_backend("auto", model=object()) == "torch-cuda"
    with pytest.raises(InvdiffError, match="--backend tpu: unknown"):
        backends.resolve_backend("tpu")
    with pytest.raises(InvdiffError, match="--backend onnxruntime: needs an export folder"):
        backends.load_runtime("onnxruntime", model=object())


def test_ort_runtime_matches_torch_runtime(exported):
    from invdiff_rt.runtime.backends.torch_backend import TorchRuntime
    from invdiff_rt.runtime.check import run_parity

    ort_rt = backends.load_runtime("onnxruntime", export_dir=exported["out"], threads=1, spinning=False)
    assert ort_rt.latent_shape == (4, 8, 8) and ort_rt.cfg
    ov_rt = backends.load_runtime("openvino", export_dir=exported["out"], threads=2)
    reference = TorchRuntime(exported["model"], exported["adapter"], device="cpu")
    # the adapter acts at t >= 600: step 1 (t = 999) with the weight, step 2 (t = 499) without, on every backend
    assert reference.adapter_from_t == ort_rt.adapter_from_t == ov_rt.adapter_from_t == 600
    rows = run_parity(reference, [ort_rt, ov_rt], batch_sizes=[1, 2, 3], steps=2, seed=0)
    assert {r.backend for r in rows} == {"onnxruntime", "openvino"}
    quantities = {r.quantity for r in rows}
    assert quantities == {"text_embeddings", "noise_pred[0]", "noise_pred[1]", "final latents", "images"}
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert max(r.rel_l2 for r in rows if r.quantity.startswith("noise_pred")) <= 1e-4
    # openvino: both steps ran the base graph (no adapter_weight input), the acting one the side graph after it
    denoiser = ov_rt.components["denoiser"]
    assert len(denoiser.graph.compiled) == len(denoiser.side.compiled) == 3  # 1 row; 2 x 1 row (2 streams); 3 rows
    assert "adapter_weight" not in denoiser.input_names and "adapter_weight" in denoiser.feed_names
    assert len(denoiser.side.model.get_ops()) < len(denoiser.graph.model.get_ops()) / 4
    assert ov_rt.components["vae_decoder"].feed_names == ["latents"]


@pytest.mark.slow
def test_check_cli_writes_json_and_passes(exported, tmp_path):
    from invdiff_rt.cli import app

    out = tmp_path / "check.json"
    args = ["check", "--model", str(exported["model_dir"]), "--adapter", str(exported["adapter_dir"]),
            "--export", str(exported["out"]), "--batch-sizes", "1,2", "--steps", "2", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["passed"] and {r["batch"] for r in report["rows"]} == {1, 2}
    assert all(r["backend"] == "onnxruntime" for r in report["rows"])


def test_check_gives_a_torch_candidate_its_own_modules(exported):
    """Building a torch candidate moves and casts its modules in place (torch-cuda: fp16 on the GPU); the CPU fp32
    reference must keep its own (a bf16 cast stands in for the GPU here)."""
    from invdiff_rt.commands.export import _runtimes

    reference, [candidate], _ = _runtimes(str(exported["model_dir"]), exported["adapter_dir"], exported["out"],
                                          ["torch"], Path("engines"))
    candidate.fused.to(torch.bfloat16)
    assert {p.dtype for p in reference.fused.parameters()} == {torch.float32}
    assert candidate.fused.adapter is not reference.fused.adapter


def test_check_asks_tensorrt_for_the_given_engine_cache(exported, monkeypatch):
    """`check --backends torch,tensorrt --engines DIR` loads DIR's engines (it had no --engines: ./engines only)."""
    from invdiff_rt.commands.export import _runtimes

    calls = []
    monkeypatch.setattr(backends, "is_available", lambda name: True)
    monkeypatch.setattr(backends, "load_runtime", lambda name, **kw: calls.append((name, kw)) or "runtime")
    _, candidates, _ = _runtimes(str(exported["model_dir"]), exported["adapter_dir"], exported["out"], ["tensorrt"],
                                 Path("my-engines"))
    assert candidates == ["runtime"] and calls[0][0] == "tensorrt" and calls[0][1]["engines_dir"] == Path("my-engines")


@pytest.mark.parametrize("backends", ["torch,torch", "torch,onnxruntime,onnxruntime", "onnxruntime,torch", "torch",
                                      "torch,torch,torch"])
def test_check_backends_must_compare_torch_with_others_each_once(exported, backends):
    """`--backends torch,torch` passed (exit 0) while testing nothing of the export."""
    from invdiff_rt.cli import app

    args = ["check", "--model", str(exported["model_dir"]), "--export", str(exported["out"]), "--backends", backends]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, InvdiffError) and str(result.exception) == (
        f"--backends {backends}: start with torch (the reference) and name at least one other backend, each once")


def test_check_cli_refuses_missing_adapter(exported):
    from invdiff_rt.cli import app

    args = ["check", "--model", str(exported["model_dir"]), "--export", str(exported["out"])]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, InvdiffError)
    assert "--adapter: the export carries adapter" in str(result.exception)
    from invdiff_rt.commands.export import _matching_adapter

    with pytest.raises(InvdiffError, match=r"^--adapter a: this export has no adapter; drop --adapter"):
        _matching_adapter("a", {"adapter": None}, None)
    manifest = json.loads((exported["out"] / "manifest.json").read_text())  # read from any folder (bench, refit)
    assert Path(manifest["base_model"]).is_absolute() and Path(manifest["adapter"]["source"]).is_absolute()


def test_cuda_binding_batch_comes_from_the_spec():
    from test_export import _fake_model

    from invdiff_rt.export.spec import denoiser_spec, text_encoder_spec
    from invdiff_rt.runtime.backends.onnxruntime_backend import _batch_of

    assert _batch_of(denoiser_spec(_fake_model()), {"sample": torch.zeros(3, 4, 8, 8)}) == 3
    assert _batch_of(text_encoder_spec(_fake_model()), {"input_ids": torch.zeros(5, 16)}) == 5


def test_the_cuda_session_runs_on_this_ranks_gpu(monkeypatch, tmp_path):
    """Under torchrun `generate` makes GPU LOCAL_RANK current; the CUDA EP session and its binding use it (they used
    GPU 0 on every rank). No GPU here: the session is recorded, not made."""
    import onnxruntime as ort

    from invdiff_rt.runtime.backends import onnxruntime_backend as ob

    made = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ob.CUDA, ob.CPU])
    monkeypatch.setattr(ort, "InferenceSession", lambda source, sess_options, providers: made.append(providers))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    ob.make_session(tmp_path / "denoiser.onnx", cuda=True)
    assert made == [[(ob.CUDA, {"device_id": 1}), ob.CPU]]


@pytest.mark.slow
def test_check_cli_exits_1_on_a_failed_threshold(exported, tmp_path, monkeypatch):
    from invdiff_rt.cli import app
    from invdiff_rt.runtime import check

    monkeypatch.setitem(check.THRESHOLDS, "fp32", dict.fromkeys(THRESHOLDS["fp32"], 0.0))
    out = tmp_path / "check.json"
    args = ["check", "--model", str(exported["model_dir"]), "--adapter", str(exported["adapter_dir"]),
            "--export", str(exported["out"]), "--batch-sizes", "1", "--steps", "1", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert json.loads(out.read_text())["passed"] is False


def test_auto_skips_openvino_for_fp16_exports(tmp_path, cpu_host):
    """openvino runs fp32 exports only: `auto` falls through to onnxruntime for an fp16 export on a CPU machine."""
    (tmp_path / "manifest.json").write_text('{"precision": "fp16"}')
    assert backends.resolve_backend("auto", export_dir=tmp_path) == "onnxruntime"
    (tmp_path / "manifest.json").write_text('{"precision": "fp32"}')
    assert backends.resolve_backend("auto", export_dir=tmp_path) == "openvino"


@pytest.mark.parametrize("export_backend", ["onnxruntime", "openvino", "auto"])
def test_generate_export_backends_and_torch_images_within_one_level(exported, tmp_path, export_backend):
    """The acceptance bar of `invdiff generate`: same seed, --backend onnxruntime / openvino / auto (openvino on a
    CPU machine) vs --backend torch, mean absolute difference of the PNGs <= 1/255 (with the adapter on, CFG on).
    Batch 2 on 2 threads: the openvino backend splits it into two single-image streams."""
    settings = dict(num=2, seed=5, steps=3, guidance_scale=3.0, adapter_weight=1.0, scheduler="ddim", batch_size=2,
                    progress=False)
    images = {}
    for backend, sources in (("torch", {"model": exported["model_dir"], "adapter": exported["adapter_dir"]}),
                             (export_backend, {"export": exported["out"]})):
        runtime, name, fingerprints = gen.load_generation_runtime(backend=backend, threads=2, **sources)
        assert name == (backends.resolve_backend("auto", export_dir="x") if backend == "auto" else backend)
        out = tmp_path / backend
        gen.run_generation(runtime, PROMPTS, out, backend=name, fingerprints=fingerprints, **settings)
        rows = read_jsonl(out / "manifest.jsonl")
        images[backend] = {(r["prompt"], r["index"]): np.asarray(Image.open(out / r["file"]), dtype=np.float64)
                           for r in rows}
    assert images["torch"].keys() == images[export_backend].keys() and len(images["torch"]) == 2 * len(PROMPTS)
    for key, ref in images["torch"].items():
        other = images[export_backend][key]
        assert ref.shape == other.shape and ref.std() > 1.0  # real images, not a constant
        assert np.abs(ref - other).mean() <= 1.0, key  # 1/255 of the range, in uint8 levels


def test_openvino_chunks_keep_cond_and_uncond_rows_together():
    from invdiff_rt.runtime.backends.openvino_backend import chunk_bounds, put_rows, take_rows

    assert chunk_bounds(16, 2) == [(0, 8), (8, 16)] and chunk_bounds(1, 2) == [(0, 1)]
    assert chunk_bounds(5, 2) == [(0, 2), (2, 5)] and chunk_bounds(3, 4) == [(0, 1), (1, 2), (2, 3)]
    emb = np.arange(8)[:, None]  # 2B rows for B=4: cond 0-3, uncond 4-7
    assert take_rows(emb, ("2B", 1), 4, 1, 3)[:, 0].tolist() == [1, 2, 5, 6]
    assert take_rows(emb, ("B", 1), 8, 1, 3)[:, 0].tolist() == [1, 2]
    assert take_rows(np.float32(3.0), (), 4, 1, 3) == 3.0  # 0-d scalars go to every chunk
    parts = [take_rows(emb, ("2B", 1), 4, a, b) for a, b in chunk_bounds(4, 2)]
    assert put_rows(parts, ("2B", 1))[:, 0].tolist() == list(range(8))
    assert put_rows([np.arange(2), np.arange(2, 5)], ("B",)).tolist() == list(range(5))
    from invdiff_rt.runtime.backends.openvino_backend import unpad

    padded = take_rows(emb, ("2B", 1), 4, 3, 4, rows=2)  # a short chunk: each half repeats its last row
    assert padded[:, 0].tolist() == [3, 3, 7, 7] and unpad(padded, ("2B", 1), 1)[:, 0].tolist() == [3, 7]
    assert take_rows(emb, ("B", 1), 8, 6, 8, rows=3)[:, 0].tolist() == [6, 7, 7]


def test_openvino_runs_an_uneven_batch_on_every_stream(exported):
    """Batch 3 on 2 threads: chunks of 2 and 1 (padded to 2) on two streams of one thread, not one stream of one
    thread; each row as at batch 1."""
    import torch

    from invdiff_rt.runtime.sampling import cfg_embeddings

    runtime = backends.load_runtime("openvino", export_dir=exported["out"], threads=2)
    x = torch.randn(3, *runtime.latent_shape, generator=torch.Generator().manual_seed(0))
    emb = cfg_embeddings(runtime, ["digit 1", "digit 2", "digit 3"], 3.0)
    whole = runtime.denoise_step(x, torch.full((3,), 700.0), emb, 3.0, 1.0)
    rows = [runtime.denoise_step(x[i:i + 1], torch.full((1,), 700.0), emb[[i, 3 + i]], 3.0, 1.0) for i in range(3)]
    assert torch.allclose(whole, torch.cat(rows), atol=1e-5, rtol=0)
    denoiser = runtime.components["denoiser"]
    streams = {len(requests) for requests in denoiser.graph.compiled.values()}
    assert streams == {1, 2}  # batch 1: one request; batch 3: two, one per stream


def test_openvino_bound_requests_return_fresh_outputs_for_fresh_inputs(exported):
    """Each infer request's inputs are bound once to buffers that every call overwrites: a call's result must not
    change when the next call runs, and must equal a fresh runtime's answer to the same inputs (batch 1: one
    synchronous request; batch 2 on 2 threads: two concurrent ones)."""
    import torch

    from invdiff_rt.runtime.sampling import cfg_embeddings

    def step(runtime, seed, batch):
        x = torch.randn(batch, *runtime.latent_shape, generator=torch.Generator().manual_seed(seed))
        emb = cfg_embeddings(runtime, [f"digit {seed + i}" for i in range(batch)], 3.0)
        return runtime.denoise_step(x, torch.full((batch,), 700.0), emb, 3.0, 1.0)

    warm = backends.load_runtime("openvino", export_dir=exported["out"], threads=2)
    for batch in (1, 2):
        first = step(warm, 0, batch)
        kept = first.clone()
        second = step(warm, 1, batch)
        assert torch.equal(first, kept) and not torch.allclose(first, second)
        fresh = backends.load_runtime("openvino", export_dir=exported["out"], threads=2)
        assert torch.equal(step(fresh, 1, batch), second)


def test_openvino_compile_config_runs_one_thread_per_stream():
    """Each chunk of a batch gets a stream of one thread, a batch of one too (two threads in one stream were 1.09x
    faster idle but 1.5x slower whenever the VM lost a core: bench/README.md); precision pinned, others refused."""
    from invdiff_rt.runtime.backends.openvino_backend import compile_config

    one, two = compile_config(1), compile_config(2, "bf16")
    assert (one["NUM_STREAMS"], one["INFERENCE_NUM_THREADS"], one["INFERENCE_PRECISION_HINT"]) == ("1", "1", "f32")
    assert (two["NUM_STREAMS"], two["INFERENCE_NUM_THREADS"], two["INFERENCE_PRECISION_HINT"]) == ("2", "2", "bf16")
    with pytest.raises(InvdiffError, match="--precision fp16"):
        compile_config(1, "fp16")


def test_openvino_bf16_is_a_compile_option_recorded_with_the_images(exported, tmp_path):
    """`invdiff generate --backend openvino --precision bf16` compiles the fp32 export with bf16 kernels (where the CPU
    has them; elsewhere OpenVINO keeps f32): images within 3/255 of the fp32 ones (measured 0.16-0.21/255 on 20- and
    25-step images), and the run's fingerprints say bf16."""
    settings = dict(num=1, seed=5, steps=3, guidance_scale=3.0, adapter_weight=1.0, scheduler="ddim", batch_size=1,
                    progress=False)
    images = {}
    for precision in ("fp32", "bf16"):
        runtime, name, fingerprints = gen.load_generation_runtime(backend="openvino", export=exported["out"],
                                                                  precision=precision, threads=1)
        assert runtime.precision == precision and fingerprints["precision"] == precision
        out = tmp_path / precision
        gen.run_generation(runtime, PROMPTS, out, backend=name, fingerprints=fingerprints, **settings)
        rows = read_jsonl(out / "manifest.jsonl")
        images[precision] = [np.asarray(Image.open(out / r["file"]), np.float64) for r in rows]
    assert len(images["bf16"]) == len(PROMPTS)
    for ref, other in zip(images["fp32"], images["bf16"]):
        assert ref.std() > 1.0 and np.abs(ref - other).mean() <= 3.0


def test_tensorrt_generation_gets_the_engine_cache_and_the_refitted_adapter(exported, monkeypatch):
    """`generate --export E --backend tensorrt --adapter A --engines DIR`: the runtime is asked for DIR's engines with
    A refitted in, and the run's fingerprints name A (the TensorRT load itself needs a GPU)."""
    from invdiff_rt.method.adapter import adapter_fingerprint

    calls = []
    monkeypatch.setattr(backends, "load_runtime", lambda name, **kw: calls.append((name, kw)) or "runtime")
    runtime, name, fingerprints = gen.load_generation_runtime(export=exported["out"], adapter=exported["adapter_dir"],
                                                              backend="tensorrt", engines="my-engines")
    assert (runtime, name) == ("runtime", "tensorrt") and fingerprints["export"]
    assert fingerprints["adapter"] == adapter_fingerprint(exported["adapter_dir"])
    assert calls[0][1]["engines_dir"] == "my-engines" and calls[0][1]["refit_adapter"] == exported["adapter_dir"]
    with pytest.raises(InvdiffError, match="^--adapter: an export folder already contains its adapter"):
        gen.load_generation_runtime(export=exported["out"], adapter=exported["adapter_dir"], backend="onnxruntime")
