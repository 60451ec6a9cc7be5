"""`invdiff bench`: statistics helpers on hand values, record merging, flag errors, and a tiny smoke run (no speed
is asserted anywhere)."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from invdiff_rt import bench
from invdiff_rt import peers as bench_peers
from invdiff_rt.errors import InvdiffError


def test_percentile_on_hand_values():
    assert bench.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert bench.percentile([4, 1, 3, 2], 90) == pytest.approx(3.7)  # 1 + 0.9 * (4 - 1), linear interpolation
    assert bench.percentile([7.0], 90) == 7.0
    assert bench.percentile([10, 20, 30], 0) == 10 and bench.percentile([10, 20, 30], 100) == 30
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_summarize_on_hand_values():
    s = bench.summarize([4.0, 1.0, 3.0, 2.0])
    assert s == pytest.approx({"p50": 2.5, "p90": 3.7, "mean": 2.5, "min": 1.0, "max": 4.0, "n": 4})


def test_ratio():
    assert bench.ratio(30.0, 10.0) == 3.0
    assert bench.ratio(None, 10.0) is None and bench.ratio(1.0, 0.0) is None


def _round(step, e2e, rss=100.0, paired=None, pair=None):
    """One worker's answer for one round: stage times, peak memory, paired steps and the e2e pair."""
    out = {"stages": {"step": [step], "e2e": [e2e]}, "peak_host_mb": rss, "peak_device_mb": None}
    if paired:  # (adapter times, base times) of the interleaved steps
        out["paired"] = {"adapter": bench.summarize(paired[0]), "base": bench.summarize(paired[1]),
                         "overhead": float(np.median(np.asarray(paired[0]) / np.asarray(paired[1])))}
        out["e2e_pair"] = {"adapter": [e2e], "base": [pair]}
    return out


def test_merge_records_computes_ratios_by_hand():
    """Two rounds of eager, torch and one peer at batch 2; every ratio is taken within a round."""
    results = {
        "eager": {2: [_round(30.0, 1000.0, paired=([30.0, 36.0], [24.0, 24.0]), pair=800.0),
                      _round(60.0, 2000.0, paired=([30.0], [20.0]), pair=1000.0)]},
        "torch": {2: [_round(10.0, 500.0, rss=321.0, paired=([10.0, 11.0, 30.0], [8.0, 10.0, 20.0]), pair=400.0),
                      _round(10.0, 250.0, rss=300.0, paired=([10.0], [10.0]), pair=250.0)]},
        "peer:openvino": {2: [{"e2e": [1000.0, 900.0, 1100.0], "peak_host_mb": 50.0},
                         {"e2e": [1000.0], "peak_host_mb": 60.0}]},
    }
    hello = json.dumps({"peer": "openvino", "versions": {"openvino": "1.0"}, "settings": {"steps": 2}})
    records, peers = bench.merge_records(results, {"eager": "backend", "torch": "backend", "peer:openvino": hello})
    records = {r["backend"]: r for r in records}
    assert set(records) == {"eager", "torch"}
    torch_rec = records["torch"]
    assert torch_rec["speedup_vs_eager"] == pytest.approx(4.5)  # rounds: 30/10, 60/10
    assert torch_rec["adapter_overhead"] == pytest.approx(1.125)  # rounds: median(10/8, 11/10, 30/20)=1.25, 1.0
    assert torch_rec["adapter_overhead_spread"]["min"] == 1.0 and torch_rec["adapter_overhead_spread"]["max"] == 1.25
    assert torch_rec["e2e_adapter_overhead"]["median"] == pytest.approx(1.125)  # 500/400, 250/250
    assert torch_rec["e2e_ms_p50"] == pytest.approx(375.0) and torch_rec["e2e_ms_rounds"] == [500.0, 250.0]
    assert torch_rec["images_per_s"] == pytest.approx(2 / 0.375)
    assert torch_rec["e2e_speedup_vs_eager"]["median"] == pytest.approx(5.0)  # 1000/500, 2000/250
    assert torch_rec["e2e_speedup_vs_eager"]["min"] == pytest.approx(2.0)
    assert torch_rec["best_peer"] == "openvino"
    assert torch_rec["vs_best_peer"]["median"] == pytest.approx(3.0)  # 1000/500, 1000/250
    assert torch_rec["vs_best_peer"]["min"] == pytest.approx(2.0) and torch_rec["vs_best_peer"]["max"] == 4.0
    assert torch_rec["base_vs_best_peer"]["median"] == pytest.approx(3.25)  # 1000/400, 1000/250
    assert torch_rec["step_ms_p90"] == pytest.approx(10.0) and torch_rec["peak_mem_mb"] == 321.0
    assert records["eager"]["speedup_vs_eager"] == 1.0
    assert records["eager"]["adapter_overhead"] == pytest.approx((1.375 + 1.5) / 2)
    (peer,) = peers
    assert [k for k in bench_peers.PEER_RECORD_KEYS if k not in peer] == []
    assert peer["e2e_ms_rounds"] == [1000.0, 1000.0] and peer["per_image_ms_p50"] == 500.0
    assert peer["versions"] == {"openvino": "1.0"} and peer["peak_mem_mb"] == 60.0
    assert peer["backend"] == "peer:openvino" and peer["peer"] == "openvino"


def test_paired_steps_interleave_and_take_the_median_ratio(monkeypatch):
    calls = []

    class Recorder:  # a runtime whose step only records the call order
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr(bench, "stage_calls", lambda rt, batch, cfg: {"step": lambda: calls.append(rt.name)})
    out = bench.paired_steps(Recorder("a"), Recorder("b"), 1, {"warmup": 1, "repeats": 4}, lambda: None)
    # warm-up pair, then per pair (order alternating) one untimed + STEP_CALLS timed calls of each side
    side = lambda name: [name] * (1 + bench.STEP_CALLS)  # noqa: E731
    assert calls == ["a", "b"] + (side("a") + side("b") + side("b") + side("a")) * 2
    assert out["adapter"]["n"] == out["base"]["n"] == 4 and out["overhead"] > 0


def test_paired_steps_take_each_sides_median_so_one_slow_call_does_not_count(monkeypatch):
    monkeypatch.setattr(bench, "stage_calls", lambda rt, batch, cfg: {"step": lambda: rt})
    slow = {"a": [50.0, 1.1, 1.1, 1.1, 1.1], "b": [1.0] * 5}  # one call of the adapter side hit by the VM
    monkeypatch.setattr(bench, "time_calls", lambda fn, warmup, repeats, sync: slow[fn()][:repeats])
    out = bench.paired_steps("a", "b", 1, {"warmup": 0, "repeats": 3}, lambda: None)
    assert out["overhead"] == pytest.approx(1.1)


def test_parse_list_and_config_errors_are_one_line():
    assert bench.parse_list("1, 8,32", "--batch-sizes", int) == [1, 8, 32]
    with pytest.raises(InvdiffError, match="--batch-sizes"):
        bench.parse_list("1,x", "--batch-sizes", int)
    with pytest.raises(InvdiffError, match="^--batch-sizes 1,8,1: names 1 twice; list each once$"):
        bench.parse_list("1,8,1", "--batch-sizes", int)  # was timed twice a round, with spreads over 2x the rounds
    bad = [dict(backends=["tvm"]), dict(batch_sizes=[0]), dict(repeats=0), dict(model=None), dict(threads=0),
           dict(scheduler="pndm"), dict(precision="int8"), dict(precision="bf16"),
           dict(peers=["openvino"], guidance_scale=1.0),  # the peers' pipelines would drop CFG: half the work
           dict(backends=["eager"], eager=False), dict(peers_python="py"), dict(base_export="e")]  # would not act
    for overrides in bad:
        kwargs = {"backends": ["torch"], "batch_sizes": [1], "model": "m", **overrides}
        with pytest.raises(InvdiffError) as info:
            bench.BenchConfig(**kwargs).check()
        assert "\n" not in str(info.value) and str(info.value).startswith("--")
    assert bench.BenchConfig(["torch", "eager"], [1], model="m").run_backends == ["eager", "torch"]


def _fake_components(*names):
    """Component entries with the specs of a small model (readers parse them)."""
    from types import SimpleNamespace

    from invdiff_rt.export.spec import component_specs

    model = SimpleNamespace(latent_shape=(4, 8, 8), image_size=32, vae_factor=4, size_multiple=16,
                            tokenizer=SimpleNamespace(model_max_length=16),
                            text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=24, vocab_size=50)))
    specs = component_specs(model, max_batch=32)
    return {name: {"spec": specs[name].to_json()} for name in names or specs}


def _fake_export(path, **fields):
    """An export folder holding only a manifest (no files listed, so verification passes)."""
    from invdiff_rt.export.manifest import FORMAT, MANIFEST_NAME

    manifest = {"format": FORMAT, "files": {}, "adapter": None, "base_fingerprint": "b" * 64, "cfg": True,
                "precision": "fp32", "max_batch": 32, "components": _fake_components(), "latent_shape": [4, 8, 8],
                "scheduler_config": {}, **fields}
    path.mkdir()
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return str(path)


def test_base_export_must_be_the_same_base_without_adapter(tmp_path):
    config = bench.BenchConfig(["onnxruntime"], [1, 8], model="m")
    adapter_export = _fake_export(tmp_path / "with", adapter={"fingerprint": "a" * 64})
    good = _fake_export(tmp_path / "good")
    assert bench.check_base_export(good, adapter_export, config) == good
    bad = {"adapter": dict(adapter={"fingerprint": "a" * 64}), "another base": dict(base_fingerprint="c" * 64),
           "no text_encoder": dict(components=_fake_components("denoiser")), "cfg=False": dict(cfg=False),
           "--precision fp32 --max-batch 8": dict(max_batch=4)}
    for i, (expected, fields) in enumerate(bad.items()):
        with pytest.raises(InvdiffError, match=expected) as info:
            bench.check_base_export(_fake_export(tmp_path / f"bad{i}", **fields), adapter_export, config)
        assert str(info.value).startswith(f"--base-export {tmp_path / f'bad{i}'}:") and "\n" not in str(info.value)
    with pytest.raises(InvdiffError, match="^--base-export .*missing: not an export folder"):
        bench.check_base_export(str(tmp_path / "missing"), adapter_export, config)


def test_sources_name_what_an_export_alone_timed(tiny_model_dir, tmp_path):
    """`bench --export E` times E's recorded base model and adapter: bench.json hashes those (it said adapter
    "fresh" and model None)."""
    from invdiff_rt.method.adapter import adapter_fingerprint
    from invdiff_rt.models.loader import model_fingerprint

    adapter = str(bench.fresh_adapter(str(tiny_model_dir), tmp_path / "adapter", 0))
    recorded = dict(adapter={"source": adapter, "fingerprint": adapter_fingerprint(adapter)},
                    base_model=str(tiny_model_dir), base_fingerprint=model_fingerprint(tiny_model_dir))
    export = _fake_export(tmp_path / "e", **recorded)
    config = bench.BenchConfig(["onnxruntime"], [1], export=export)
    sources = bench.resolve_sources(config, tmp_path)
    assert sources == (str(tiny_model_dir), adapter)
    # the recorded sources are checked too: eager and torch would time another model than the engines
    changed = _fake_export(tmp_path / "changed", **{**recorded, "base_fingerprint": "c" * 64})
    with pytest.raises(InvdiffError, match=r"^--export .*changed: its base model .* changed since the export"):
        bench.checked_sources(bench.BenchConfig(["onnxruntime"], [1], export=changed), tmp_path)
    fingerprints = bench.source_fingerprints(config, *sources)
    assert fingerprints["model"] == model_fingerprint(tiny_model_dir)
    assert fingerprints["adapter"] == adapter_fingerprint(adapter) and len(fingerprints["export"]) == 64
    assert bench.checked_sources(config, tmp_path) == (sources, fingerprints)  # hashed once, checked, kept


def test_an_export_is_checked_against_what_the_bench_asks(tiny_model_dir, tmp_path):
    """`--export E` holds the bench's precision, batch sizes and size; `--adapter`/`--model` are E's own (eager and
    torch time them, the engine backends E's); `--base-export` holds the size too."""
    adapter = str(bench.fresh_adapter(str(tiny_model_dir), tmp_path / "adapter", 0))
    from invdiff_rt.method.adapter import adapter_fingerprint
    from invdiff_rt.models.loader import model_fingerprint

    recorded = {"source": adapter, "fingerprint": adapter_fingerprint(adapter)}
    export = _fake_export(tmp_path / "e", adapter=recorded, base_model=str(tiny_model_dir), precision="fp16",
                          max_batch=8, base_fingerprint=model_fingerprint(tiny_model_dir), latent_shape=[4, 8, 8],
                          image_size=32)
    for config, message in (
            (dict(batch_sizes=[1]), "exported at fp16 up to batch 8, the bench asks for fp32 up to batch 1; bench it "
                                    "with --precision fp16"),
            (dict(batch_sizes=[1, 16], precision="fp16"), "up to batch 8, the bench asks for fp16 up to batch 16"),
            (dict(batch_sizes=[1], precision="fp16", latent_shape=[4, 16, 16]),
             r"--height/--width 64x64: outside the range of --export .*\(32x32 to 32x32\)")):
        with pytest.raises(InvdiffError, match=message):
            bench.resolve_sources(bench.BenchConfig(["onnxruntime"], export=export, **config), tmp_path)
    ok = bench.BenchConfig(["onnxruntime"], [1, 8], export=export, precision="fp16")
    assert bench.resolve_sources(ok, tmp_path) == (str(tiny_model_dir), adapter)
    other = str(bench.fresh_adapter(str(tiny_model_dir), tmp_path / "other", 1))
    with pytest.raises(InvdiffError, match="^--adapter .*other: not the adapter --export .* was made with"):
        bench.checked_sources(replace(ok, adapter=other), tmp_path)
    with pytest.raises(InvdiffError, match="^--model colored-digits: not the model --export"):
        bench.checked_sources(replace(ok, model="colored-digits"), tmp_path)
    base = _fake_export(tmp_path / "base", precision="fp16", latent_shape=[4, 8, 8], image_size=32,
                        base_fingerprint=model_fingerprint(tiny_model_dir))
    with pytest.raises(InvdiffError, match="^--height/--width 64x64: outside the range of --base-export"):
        bench.check_base_export(base, export, replace(ok, latent_shape=[4, 16, 16]))
    assert bench.requested_sizes(str(tiny_model_dir), replace(ok, latent_shape=[4, 16, 12])) == ((64, 48),) * 3


def test_peak_memory_is_read_before_the_no_adapter_copy_loads(monkeypatch):
    """A worker holds the adapter runtime and the one without it (the overhead pair); its `peak_mem_mb` is the
    first's alone, after one image per batch size, as a peer's pipeline counts one model."""
    loaded = []
    monkeypatch.setattr(bench, "load_job_runtime", lambda job: loaded.append(job.adapter) or object())
    monkeypatch.setattr(bench, "stage_calls", lambda runtime, batch, cfg: {"e2e": lambda: loaded.append(batch)})
    monkeypatch.setattr(bench, "peak_host_mb", lambda: 100.0 * len(loaded))
    job = bench.Job("torch", {"threads": None, "batch_sizes": [8, 1]}, model="m", adapter="a", base={"adapter": None})
    server = bench.BackendServer(job)
    assert loaded == ["a", 1, 8, None, 1, 8] and server.peaks == {1: (200.0, None), 8: (300.0, None)}


def test_bf16_bench_times_openvino_on_fp32_exports(tmp_path):
    """--precision bf16 is openvino's compile option: the bench exports (and checks its base export) at fp32."""
    config = bench.BenchConfig(["openvino"], [1, 8], model="m", precision="bf16").check()
    assert config.export_precision == "fp32" and config.run_backends == ["eager", "openvino"]
    adapter_export = _fake_export(tmp_path / "with", adapter={"fingerprint": "a" * 64})
    assert bench.check_base_export(_fake_export(tmp_path / "base"), adapter_export, config) == str(tmp_path / "base")
    with pytest.raises(InvdiffError, match="^--precision bf16: only the openvino backend .*--backends openvino$"):
        bench.BenchConfig(["onnxruntime", "openvino"], [1], model="m", precision="bf16").check()


def test_rows_record_the_precision_they_ran(monkeypatch):
    """`--precision fp16` on a CPU timed eager and torch at fp32 under a title and a config that said fp16."""
    import torch

    fp16, bf16 = {"precision": "fp16"}, {"precision": "bf16"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    jobs = [(b, fp16) for b in ("eager", "torch", "onnxruntime", "openvino")] + [(b, bf16) for b in ("eager", "openvino")]
    ran = {(b, c["precision"]): bench.job_precision(bench.Job(b, c)) for b, c in jobs}
    assert ran == {("eager", "fp16"): "fp32", ("torch", "fp16"): "fp32", ("onnxruntime", "fp16"): "fp16",
                   ("openvino", "fp16"): "fp16", ("eager", "bf16"): "fp32", ("openvino", "bf16"): "bf16"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.job_precision(bench.Job("torch", fp16)) == bench.job_precision(bench.Job("eager", fp16)) == "fp16"
    assert [bench._backend_label({"backend": "eager", "precision": p}, "fp16") for p in ("fp16", "fp32", None)] \
        == ["eager", "eager (fp32)", "eager"]


def _check_schema(result):
    assert result["format"] == bench.FORMAT and result["machine"]["cores"] >= 1 and "versions" in result["machine"]
    records = result["records"]
    by = {(r["backend"], r["batch_size"]): r for r in records}
    assert ("eager", 1) in by
    for r in records:
        missing = [k for k in bench.RECORD_KEYS if k not in r]
        assert not missing, missing
        for stage in bench.STAGES:
            assert r[f"{stage}_ms_p50"] > 0 and r[f"{stage}_ms_p90"] >= r[f"{stage}_ms_p50"]
            assert r["stages"][stage]["n"] == result["config"]["repeats"] * result["config"]["rounds"]
        assert r["peak_mem_mb"] > 0 and r["images_per_s"] > 0 and r["adapter_overhead"] > 0
        eager = by[("eager", r["batch_size"])]
        rounds = r["paired_rounds"]  # one repeat per round: each round's ratio is the ratio of its two calls
        assert len(rounds) == result["config"]["rounds"] == len(r["e2e_ms_rounds"])
        assert all(p["adapter"]["n"] == p["base"]["n"] == result["config"]["repeats"] for p in rounds)
        ratios = [p["adapter"]["p50"] / p["base"]["p50"] for p in rounds]
        assert r["adapter_overhead"] == pytest.approx(np.median(ratios))
        assert r["adapter_overhead_spread"]["min"] == pytest.approx(min(ratios))
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["e2e_ms_p50"] / 1e3))
        assert r["e2e_ms_p50"] == pytest.approx(np.median(r["e2e_ms_rounds"]))
        if r["backend"] == "eager":
            assert r["speedup_vs_eager"] == 1.0 and r["e2e_speedup_vs_eager"]["max"] == 1.0
    return by


def test_smoke_in_process_torch(tiny_model_dir, tmp_path):
    config = bench.BenchConfig(["torch"], [1], model=str(tiny_model_dir), steps=2, warmup=0, repeats=1, threads=1,
                               rounds=2)
    result = bench.run_bench(config, isolate=False)
    by = _check_schema(result)
    assert set(by) == {("eager", 1), ("torch", 1)} and {r["precision"] for r in result["records"]} == {"fp32"}
    assert result["sources"]["adapter"] == "fresh" and len(result["sources"]["model"]) == 64
    path = bench.write_json(result, tmp_path / "bench.json")
    assert json.loads(path.read_text())["records"] == json.loads(json.dumps(result["records"]))
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(bench.table(result))
    text = console.export_text()
    assert "eager" in text and "torch" in text and "interleaved rounds" in text
    png = bench.plot(result, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_cli_bad_backend_is_one_line_error(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "invdiff_rt.cli", "bench", "--model", "colored-digits", "--backends", "tvm",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [s for s in proc.stderr.splitlines() if s.strip()]
    assert len(lines) == 1 and "--backends" in lines[0] and not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two ONNX exports of the tiny model: minutes on a shared 2-core CPU
def test_cli_end_to_end_with_onnxruntime(tiny_model_dir, tmp_path):
    """One process per backend, ONNX exports with and without adapter, JSON + plot."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "invdiff_rt.cli", "bench", "--model", str(tiny_model_dir), "--backends",
           "torch,onnxruntime", "--batch-sizes", "1", "--steps", "2", "--warmup", "0", "--repeats", "1",
           "--threads", "1", "--json", str(out), "--plot", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by = _check_schema(json.loads(out.read_text()))
    assert set(by) == {("eager", 1), ("torch", 1), ("onnxruntime", 1)}
    assert png.stat().st_size > 1000


def test_peak_host_memory_is_the_workers_own_not_the_parents():
    """ru_maxrss carries the parent's RSS into a forked+exec'd child; a worker must report its own peak."""
    import subprocess
    import sys

    import torch  # noqa: F401  (makes this process's RSS large)

    from invdiff_rt.bench import peak_host_mb

    ballast = bytearray(200 * 2**20)  # touched: +200 MB resident in the parent
    ballast[::4096] = b"x" * len(ballast[::4096])
    parent = peak_host_mb()
    out = subprocess.run([sys.executable, "-c", "from invdiff_rt.bench import peak_host_mb; print(peak_host_mb())"],
                         capture_output=True, text=True, check=True)
    child = float(out.stdout)
    assert parent > 200 and 5 < child < parent / 2


def test_interleave_rotation_and_spread_on_hand_values():
    from invdiff_rt.interleave import rotation, round_ratios, spread

    assert [rotation(["a", "b", "c"], r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"],
                                                                ["c", "a", "b"], ["a", "b", "c"]]
    s = spread([4.0, 1.0, 3.0, 2.0])
    assert s == pytest.approx({"median": 2.5, "min": 1.0, "max": 4.0, "q1": 1.75, "q3": 3.25, "n": 4})
    assert round_ratios([10.0, 30.0, 20.0], [5.0, 10.0, 20.0])["median"] == 2.0
    with pytest.raises(ValueError):
        round_ratios([1.0], [1.0, 2.0])


def test_run_rounds_interleaves_contenders_round_by_round():
    from invdiff_rt.interleave import LocalWorker, run_rounds

    calls = []

    def worker(name):
        return LocalWorker(name, lambda: {}, lambda req: calls.append((name, req["batch"])) or {"n": len(calls)})

    out = run_rounds({n: worker(n) for n in "ab"}, [1, 4], rounds=2)
    assert calls == [("a", 1), ("b", 1), ("a", 4), ("b", 4), ("b", 1), ("a", 1), ("b", 4), ("a", 4)]
    assert out["a"][4] == [{"n": 3}, {"n": 8}] and len(out["b"][1]) == 2


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("dpm", "DPMSolverMultistepScheduler"),
                                      ("euler", "EulerDiscreteScheduler")])
def test_peers_get_the_benchs_scheduler(name, cls):
    """The peers ran DDIM whatever --scheduler said: with dpm or euler the comparison was not like for like."""
    from invdiff_rt.models.loader import resolve_model

    config = json.loads((Path(resolve_model("colored-digits")) / "scheduler" / "scheduler_config.json").read_text())
    scheduler = bench_peers.scheduler_like_ours(config, name)
    assert type(scheduler).__name__ == cls and scheduler.config.num_train_timesteps == 1000


def test_peers_get_the_benchs_threads():
    """torch.set_num_threads reached neither the ONNX Runtime nor the OpenVINO peer: with --threads 1 they used
    every core against our one-thread rows."""
    runner = bench_peers.PeerRunner.__new__(bench_peers.PeerRunner)
    runner.name, runner.cfg = "optimum-ort", {"threads": 1}
    assert runner._runtime_kwargs()["session_options"].intra_op_num_threads == 1
    runner.name = "openvino"
    assert runner._runtime_kwargs() == {"compile": False, "ov_config": {"INFERENCE_NUM_THREADS": "1"}}
    runner.cfg = {"threads": None}
    assert runner._runtime_kwargs() == {"compile": False}  # its defaults: what a user gets
    runner.name = "optimum-ort"
    assert runner._runtime_kwargs() == {}


def test_a_peers_python_that_cannot_serve_is_named_with_the_fix(tmp_path):
    """`--peers-python /usr/bin/python3` (no numpy) died with a line that named neither the flag nor the fix."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'numpy'\" >&2\nexit 1\n")
    python.chmod(0o755)
    worker = bench.start_worker("peer:openvino", {"peer": "openvino", "config": {}}, tmp_path, str(python), True)
    with pytest.raises(InvdiffError) as e:
        worker.start()
    worker.close()
    assert str(e.value) == ("--backends/--peers peer:openvino: its worker died (ModuleNotFoundError: No module named "
                            f"'numpy'); --peers-python {python}: a venv with invdiff-rt and its [peers] extra "
                            "(`make peers-venv`)")


def test_missing_peer_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    """Without the [peers] extra a peer worker says why in one line, and the bench runs on without it."""
    from invdiff_rt.interleave import ProcessWorker

    monkeypatch.setattr(bench_peers.importlib.metadata, "version",
                        lambda dist: (_ for _ in ()).throw(bench_peers.importlib.metadata.PackageNotFoundError(dist)))
    hello = bench_peers.PeerServer({"peer": "openvino", "config": {}}).hello()
    assert hello == {"skip": "peer openvino: skipped (optimum-intel is not installed); `make peers-venv`, then "
                             "pass --peers-python .venv-peers/bin/python (the peers pin older transformers: their "
                             "own venv)"}
    if bench_peers.missing_reason("optimum-ort") is None:
        pytest.skip("the [peers] extra is installed here: the worker process would load the pipeline")
    job = {"peer": "optimum-ort", "config": {}}
    worker = bench.start_worker("optimum-ort", job, tmp_path, None, isolate=True)
    assert isinstance(worker, ProcessWorker)
    kinds = bench.start_all({"optimum-ort": worker}, print)
    worker.close()
    assert kinds == {}
    lines = [s for s in capsys.readouterr().out.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("peer optimum-ort: skipped (") and "make peers-venv" in lines[0]


def test_bad_peer_name_is_one_line_error():
    with pytest.raises(InvdiffError, match="^--peers: unknown peer 'diffusers'; choose from optimum-ort, openvino$"):
        bench.BenchConfig(["torch"], [1], model="m", peers=["diffusers"]).check()


def test_a_peer_interpreter_that_is_not_one_is_one_line(tmp_path):
    """`bench --peers-python` naming a file that cannot run, or a program that is not the worker, reached a
    PermissionError / JSONDecodeError traceback."""
    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.interleave import ProcessWorker

    script = tmp_path / "notpy"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(InvdiffError, match=rf"peer:x: cannot start {script} \(Permission denied\); fix$"):
        ProcessWorker("peer:x", [str(script)], tmp_path / "a.log", "; fix")
    script.chmod(0o755)
    worker = ProcessWorker("peer:x", [str(script)], tmp_path / "b.log", "; fix")
    with pytest.raises(InvdiffError, match=r"peer:x: its worker answered 'hi', not the benchmark's JSON; fix$"):
        worker.start()
    worker.proc.wait()


def test_a_relative_peers_python_is_taken_from_the_callers_folder(tmp_path, monkeypatch):
    """`--peers-python .venv-peers/bin/python` (as `make peers-venv` prints it) reached the worker relative: the
    worker starts in another folder, where no such file is. The command passes it on absolute."""
    from typer.testing import CliRunner

    from invdiff_rt.cli import app

    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    seen = []

    def stop(config, log):
        seen.append(config.peers_python)
        raise InvdiffError("stopped before timing")

    monkeypatch.setattr(bench, "run_bench", stop)
    r = CliRunner().invoke(app, ["bench", "--model", "colored-digits", "--backends", "eager", "--peers", "openvino",
                                 "--peers-python", "venv/bin/python", "--json", "b.json"])
    assert seen == [str(python)] and str(r.exception) == "stopped before timing", r.output
    assert not (tmp_path / "b.json").exists()
