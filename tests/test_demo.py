"""Smoke test of `invdiff demo`: every stage runs on a tiny random model; report files exist and are non-empty;
a rerun reuses every stage. Speed is not asserted."""

import json

import pytest


@pytest.mark.slow
def test_demo_end_to_end_smoke_and_stage_reuse(tmp_path, tiny_model_dir, monkeypatch):
    from rich.console import Console

    from invdiff_rt.demo import DemoConfig, run_demo

    cfg = DemoConfig(model=str(tiny_model_dir), per_prompt=2, generate_per_prompt=1, train_steps=2,
                     bench_batch_sizes=(1,), bench_steps=2, bench_repeats=1, threads=1,
                     calibrate_per_prompt=2, calibrate_min_samples=0)
    out = tmp_path / "demo"
    report = run_demo(out, cfg, console=Console(quiet=True))
    text = report.read_text()
    assert "| bias ↓ |" in text and "| onnxruntime | 1 |" in text
    weight = json.loads((out / "adapter" / "adapter" / "adapter.json").read_text())["calibration"]
    assert f"Adapter weight **{weight['by_guidance_scale']['3']['weight']:g}**: calibrated label-free" in text
    from invdiff_rt.method.splits import describe

    manifest = json.loads((out / "adapter" / "adapter" / "adapter.json").read_text())
    assert f"Second split: {describe(manifest['second_split'])}." in text  # the test's verdict, or "no candidate"
    for name in ("bias_per_prompt.png", "eval-base/grid.png", "eval-debiased/grid.png", "bench/latency.png",
                 "bench/bench.json", "eval-debiased/eval.json"):
        assert (out / name).stat().st_size > 0, name
    stages = ("data", "groups", "adapter", "export", "generate", "eval-base", "eval-debiased", "bench")
    for stage in stages:
        record = json.loads((out / stage / "stage.json").read_text())
        assert record["key"] and "result" in record
    after = json.loads((out / "eval-debiased" / "eval.json").read_text())
    assert after["n_per_prompt"] == 2 and 0 <= after["bias"] <= 1
    before = json.loads((out / "eval-base" / "eval.json").read_text())
    from invdiff_rt.runtime.backends import resolve_backend

    fastest = resolve_backend("auto", export_dir=out)  # openvino on a CPU machine
    assert before["settings"]["backend"] == after["settings"]["backend"] == fastest
    assert before["settings"]["adapter_fingerprint"] is None and after["settings"]["adapter_fingerprint"]
    base_export = json.loads((out / "export" / "onnx-base" / "manifest.json").read_text())
    assert base_export["adapter"] is None and set(base_export["components"]) >= {"denoiser", "vae_decoder"}
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert bench["config"]["base_export"] == str(out / "export" / "onnx-base")
    assert {r["backend"] for r in bench["records"]} >= {"eager", "torch", "onnxruntime", "openvino"}
    # second run: every stage is reused (recorded as 0 s)
    mtime = (out / "adapter" / "stage.json").stat().st_mtime
    run_demo(out, cfg, console=Console(quiet=True))
    assert (out / "adapter" / "stage.json").stat().st_mtime == mtime
    # other shipped classifiers: the two eval stages run again, nothing before them
    from invdiff_rt import demo

    scored = (out / "eval-base" / "stage.json").stat().st_mtime
    monkeypatch.setattr(demo, "_classifier_fingerprint", lambda: "other classifiers")
    run_demo(out, cfg, console=Console(quiet=True))
    assert (out / "adapter" / "stage.json").stat().st_mtime == mtime
    assert (out / "eval-base" / "stage.json").stat().st_mtime != scored


def test_stage_with_changed_inputs_starts_from_an_empty_folder(tmp_path):
    """Same inputs: the recorded result, fn not called; other inputs: the old outputs are gone before fn runs."""
    from rich.console import Console

    from invdiff_rt.demo import Stages

    stages, calls = Stages(tmp_path, Console(quiet=True)), []

    def make(tag):
        def fn(folder):
            calls.append(sorted(p.name for p in folder.iterdir()))
            (folder / f"{tag}.txt").write_text(tag)
            return {"tag": tag}
        return fn

    assert stages.run("gen", {"w": 1.0}, make("a")) == {"tag": "a"}
    assert stages.run("gen", {"w": 1.0}, make("b")) == {"tag": "a"} and len(calls) == 1  # reused
    assert stages.run("gen", {"w": 2.0}, make("c")) == {"tag": "c"}
    assert calls == [[], []] and sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["c.txt", "stage.json"]

