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



def test_a_demo_folder_is_new_empty_or_a_demos_and_its_records_move_with_it(tmp_path, monkeypatch):
    """A rerun deletes changed stages' folders, so --out may not hold the user's files; stage records name the
    demo's own files relative to it, so a moved or copied demo reuses its own (not the old folder's)."""
    import shutil

    from rich.console import Console

    from invdiff_rt import demo
    from invdiff_rt.errors import InvdiffError

    mine = tmp_path / "project"
    (mine / "bench").mkdir(parents=True)
    (mine / "bench" / "README.md").write_text("notes")
    with pytest.raises(InvdiffError, match=r"project: holds other files \(no demo.json\), which a rerun could"):
        demo.check_demo_folder(mine)
    monkeypatch.chdir(mine)
    with pytest.raises(InvdiffError, match=r"^--out \.: holds the current folder"):
        demo.check_demo_folder(".")
    monkeypatch.chdir(tmp_path.parent)
    (tmp_path / "empty").mkdir()
    (tmp_path / "marked" / "bench").mkdir(parents=True)
    (tmp_path / "marked" / demo.MARKER).write_text("{}")
    (tmp_path / "legacy" / "data").mkdir(parents=True)  # a demo folder from before the marker
    (tmp_path / "legacy" / "data" / "stage.json").write_text("{}")
    for ok in ("new", "empty", "marked", "legacy"):
        demo.check_demo_folder(tmp_path / ok)

    first = tmp_path / "d1"
    stages = demo.Stages(first, Console(quiet=True))
    result = stages.run("adapter", {"k": 1}, lambda f: {"path": str(f / "adapter"), "outside": "/elsewhere/x",
                                                          "nested": [{"dir": str(f)}]})
    record = json.loads((first / "adapter" / "stage.json").read_text())["result"]
    assert record == {"path": "$OUT/adapter/adapter", "outside": "/elsewhere/x", "nested": [{"dir": "$OUT/adapter"}]}
    assert result["path"] == str(first / "adapter" / "adapter")
    shutil.copytree(first, tmp_path / "copy")
    again = demo.Stages(tmp_path / "copy", Console(quiet=True)).run("adapter", {"k": 1}, lambda f: 1 / 0)
    assert again == {"path": str(tmp_path / "copy" / "adapter" / "adapter"), "outside": "/elsewhere/x",
                     "nested": [{"dir": str(tmp_path / "copy" / "adapter")}]}

    # a rerun first removes the report it will rewrite (an interrupted rerun left it describing older stages)
    out = tmp_path / "d2"
    out.mkdir()
    for name in (demo.MARKER, "report.md", demo.CHART):
        (out / name).write_text("{}")
    with pytest.raises(InvdiffError):
        demo.run_demo(out, demo.DemoConfig(model=str(tmp_path / "no-model")), console=Console(quiet=True))
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER]

    cfg = demo.DemoConfig()
    exports = ({"files": {"a": "1"}}, {"files": {"b": "2"}})
    key = demo.bench_inputs(cfg, *exports)
    assert demo.bench_inputs(demo.DemoConfig(per_prompt=5, train_steps=3), *exports) == key  # the bench is reused
    assert demo.bench_inputs(demo.DemoConfig(bench_steps=3), *exports) != key


def test_eval_refuses_a_default_grid_path_that_cannot_be_written(tmp_path):
    from typer.testing import CliRunner

    from invdiff_rt.cli import app

    (tmp_path / "d").mkdir()
    base = ["eval", "--model", "colored-digits", "--data", str(tmp_path / "d"), "--attribute", "color",
            "--per-prompt", "2", "--seed", "0"]
    r = CliRunner().invoke(app, base + ["--json", str(tmp_path / "a.png")])
    assert "--json" in str(r.exception) and "which is this file too; name the report .json or pass --grid" in str(
        r.exception)
    (tmp_path / "b.png").mkdir()
    r = CliRunner().invoke(app, base + ["--json", str(tmp_path / "b.json")])
    assert "b.png by default, which is a folder" in str(r.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "d"]


def test_eval_names_the_flag_of_a_missing_column_and_the_folder_of_a_classifier_pair(tmp_path):
    from invdiff_rt.data.recipes import RECIPES
    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.eval.classifiers import default_classifier_dir, load_classifier_pair
    from invdiff_rt.eval.evaluate import run_evaluation

    pair = default_classifier_dir("colored-digits")
    with pytest.raises(InvdiffError, match=r"attribute: one classifier of a pair; pass the folder that holds it"):
        load_classifier_pair(pair / "attribute", "color")
    data = RECIPES["shapes-habitats"](tmp_path / "d", bias=0.9, seed=0, size=32, n_train=8, n_test=4)
    with pytest.raises(InvdiffError, match=r'^--attribute color: .*metadata.jsonl:1: missing column "color"'):
        run_evaluation("colored-digits", data, "color", per_prompt=2)
