"""End-to-end method stage on a tiny random model: `groups` -> `train`, errors, resume and a 2-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from invdiff_rt.cli import app

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = ["a photo of the digit 0", "a photo of the digit 1"]


def _write_dataset(root: Path, per_prompt: int = 10) -> Path:
    """Two prompts, 32x32 squares; colour red for prompt 0 / green for prompt 1 except 2 minority images each."""
    rng = np.random.default_rng(0)
    lines = []
    (root / "train").mkdir(parents=True)
    for p, text in enumerate(PROMPTS):
        for i in range(per_prompt):
            color = ["red", "green"][p] if i >= 2 else ["green", "red"][p]
            img = np.zeros((32, 32, 3), np.uint8)
            img[6 + i % 4:24, 8:26, 0 if color == "red" else 1] = 200 + rng.integers(0, 50)
            name = f"{p}_{i}.png"
            Image.fromarray(img).save(root / "train" / name)
            lines.append(json.dumps({"file_name": name, "text": text, "color": color}))
    (root / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from invdiff_rt.models.tiny import save_random_model

    tmp = tmp_path_factory.mktemp("method")
    before_env, before_threads = os.environ.get("INVDIFF_CACHE_DIR"), torch.get_num_threads()
    os.environ["INVDIFF_CACHE_DIR"] = str(tmp / "cache")
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: 1 thread is ~20x faster than 2
    yield save_random_model(tmp / "model", PROMPTS, seed=0), _write_dataset(tmp / "data"), tmp
    torch.set_num_threads(before_threads)
    if before_env is None:
        os.environ.pop("INVDIFF_CACHE_DIR", None)
    else:
        os.environ["INVDIFF_CACHE_DIR"] = before_env


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


@pytest.mark.slow
def test_groups_then_train_end_to_end(setup):
    model, data, tmp = setup
    prefix = tmp / "groups" / "G"
    r = _invoke("groups", "--model", str(model), "--data", str(data), "--out", str(prefix),
                "--report-attribute", "color", "--batch-size", "8", "--draws", "2", "--grid-samples", "12")
    assert r.exit_code == 0, r.output
    meta = json.loads(prefix.with_suffix(".json").read_text())
    assert meta["recipe"] == "invdiff-rt" and meta["n"] == 20 and meta["groups"] == 2
    assert meta["diagnostics"]["minority_size"] == 4 and 0 <= meta["diagnostics"]["auroc"] <= 1
    lo, hi = meta["profile"]["band"]
    assert len(meta["profile"]["skewness"]) == 6 and lo <= meta["profile"]["t_star"] <= hi and 49 <= hi - lo <= 50
    assert "AUROC" in r.output
    out = tmp / "adapter"
    r = _invoke("train", "--model", str(model), "--data", str(data), "--groups", str(prefix), "--out", str(out),
                "--steps", "5", "--batch-size", "4", "--checkpoint-every", "2")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["steps"] == 5 and manifest["recipe"] == "invdiff-rt" and manifest["lambda"] == 0.0
    assert manifest["groups_fingerprint"] == meta["fingerprint"] and manifest["groups_source"] == "inferred"
    assert np.isfinite(manifest["final"]["loss"]) and not (tmp / "adapter.ckpt").exists()
    from invdiff_rt.method.adapter import load_adapter
    from invdiff_rt.models.loader import load_model

    adapter = load_adapter(out, load_model(model))
    assert any(p.abs().sum() > 0 for p in adapter.conv_out.parameters())  # it trained away from zero-init
    # from_t: the first t of the recorded shift profile at >= 3/4 of its top (targets.active_from_t)
    rms = {int(t): r for t, r in manifest["from_t_rule"]["shift_rms"].items()}
    top = max(rms.values())
    assert manifest["from_t"] == (min(t for t, r in rms.items() if r >= 0.75 * top) if top > 1e-6 else 0)
    assert adapter.from_t == manifest["from_t"] and manifest["active_only"] is True


@pytest.mark.slow
def test_groups_with_the_classifier_score(setup):
    from invdiff_rt.method.grouper import load_groups

    model, data, tmp = setup
    prefix = tmp / "groups-classifier" / "G"
    r = _invoke("groups", "--model", str(model), "--data", str(data), "--out", str(prefix), "--score", "classifier",
                "--batch-size", "8", "--grid-samples", "12")
    assert r.exit_code == 0, r.output
    result = load_groups(prefix)
    assert result.meta["profile"]["score"] == "classifier" and result.meta["profile"]["source"] == "inferred"
    assert result.grouping.weights.shape == (20, 2) and result.grouping.sampling.shape == (20,)
    r = _invoke("groups", "--model", str(model), "--data", str(data), "--out", str(tmp / "g2"), "--score", "nope")
    assert r.exit_code != 0 and "--score nope: unknown; choose one of contrast, classifier" in str(r.exception)
    assert not (tmp / "g2.json").exists()


@pytest.mark.slow
def test_cli_errors_are_one_line(setup):
    model, data, tmp = setup
    r = _invoke("train", "--model", str(model), "--data", str(data), "--out", str(tmp / "x"), "--steps", "2")
    assert r.exit_code != 0 and "--groups: recipe invdiff-rt needs groups" in str(r.exception)
    r = _invoke("groups", "--model", str(model), "--data", str(data), "--out", str(tmp / "g"), "--recipe", "erm")
    assert "--recipe erm: needs no groups" in str(r.exception)
    r = _invoke("train", "--model", str(model), "--data", str(data), "--out", str(tmp / "x"), "--recipe", "nope")
    assert "--recipe nope: unknown" in str(r.exception)
    for bad in ("soon", "-5", "1000"):  # 1000: no training timestep is drawn there, the adapter would never act
        r = _invoke("train", "--model", str(model), "--data", str(data), "--out", str(tmp / "x"), "--recipe", "erm",
                    "--from-t", bad)
        assert f"--from-t {bad}: give a timestep in 0..999 (0: every step) or auto" in str(r.exception)
    assert not (tmp / "x").exists()


@pytest.mark.slow
def test_crash_leaves_no_adapter_and_resume_is_exact(setup, monkeypatch):
    from safetensors.torch import load_file

    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.method import train
    from invdiff_rt.models.loader import load_model

    model_dir, data, tmp = setup
    model = load_model(model_dir)
    cfg = train.TrainConfig(recipe="paper", oracle_column="color", steps=4, batch_size=4, checkpoint_every=2,
                            show_progress=False)
    straight = train.train_adapter(model, data, None, tmp / "straight", cfg)
    manifest = json.loads((straight / "adapter.json").read_text())
    assert manifest["groups_source"] == "oracle:color" and manifest["variance"] == "raw"

    crash_at(monkeypatch, 3, lambda: train.train_adapter(model, data, None, tmp / "resumed", cfg))
    assert not (tmp / "resumed").exists() and (tmp / "resumed.ckpt" / "state.json").exists()
    real_key = train._run_key
    monkeypatch.setattr(train, "_run_key", lambda config, meta, processes: real_key(config, meta, 2))
    with pytest.raises(InvdiffError, match="checkpoint was made with other settings"):  # another process count
        train.train_adapter(model, data, None, tmp / "resumed", dataclasses_replace(cfg, resume=True))
    monkeypatch.setattr(train, "_run_key", real_key)
    # what does not shape the steps may change on resume
    resumed = train.train_adapter(model, data, None, tmp / "resumed",
                                  dataclasses_replace(cfg, resume=True, checkpoint_every=3, calibrate_per_prompt=2))
    assert json.loads((resumed / "adapter.json").read_text())["resumed_from_step"] == 2
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_adapter_does_not_depend_on_the_thread_count(setup):
    """The steps' batches and frozen predictions are made ahead in 1-thread workers while the adapter trains on one
    thread (`parallel.map_ahead`): two threads and one give the same adapter, bit for bit, and the thread setting
    is restored."""
    from safetensors.torch import load_file

    from invdiff_rt.method import train
    from invdiff_rt.models.loader import load_model

    model_dir, data, tmp = setup
    model, before = load_model(model_dir), torch.get_num_threads()
    cfg = train.TrainConfig(oracle_column="color", steps=6, batch_size=4, show_progress=False)
    try:
        runs = {}
        for n in (2, 1):
            torch.set_num_threads(n)
            runs[n] = load_file(str(train.train_adapter(model, data, None, tmp / f"threads{n}", cfg) /
                                    "adapter.safetensors"))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(runs[2][k], runs[1][k]) for k in runs[1])
    assert any(runs[1][k].abs().max() > 0 for k in runs[1] if "conv_out" in k)  # it trained: the zero-init moved


def crash_at(monkeypatch, crash_step: int, run) -> None:
    """Run `run()` with a training step that raises KeyboardInterrupt at `crash_step`; the real step after."""
    from invdiff_rt.method import train

    real_step = train._train_step

    def crashing(accelerator, run_, config, step, first, prepared):
        if step == crash_step:
            raise KeyboardInterrupt
        return real_step(accelerator, run_, config, step, first, prepared)

    monkeypatch.setattr(train, "_train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train, "_train_step", real_step)


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


@pytest.mark.slow
def test_two_process_accelerate_cpu_run(setup):
    model, data, tmp = setup
    out = tmp / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INVDIFF_CACHE_DIR": str(tmp / "cache")}
    # `accelerate launch --cpu` starts one process without an MPI/oneCCL config; torchrun's env (gloo) is what
    # Accelerate uses for multi-process CPU, and on GPUs `accelerate launch --multi_gpu` runs the same code.
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "invdiff_rt.cli", "train",
           "--model", str(model), "--data", str(data), "--out", str(out), "--recipe", "erm", "--steps", "3",
           "--batch-size", "4", "--threads", "1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["recipe"] == "erm" and manifest["lambda"] == 0.0


@pytest.mark.slow
def test_second_split_is_tested_after_training_and_a_resumed_fine_tune_replays_it(setup, monkeypatch):
    from safetensors.torch import load_file

    from invdiff_rt.method import splits, train
    from invdiff_rt.method.grouper import load_groups
    from invdiff_rt.models.loader import load_model

    model_dir, data, tmp = setup
    prefix = tmp / "groups-split" / "G"
    r = _invoke("groups", "--model", str(model_dir), "--data", str(data), "--out", str(prefix), "--batch-size", "8",
                "--grid-samples", "12")
    assert r.exit_code == 0, r.output
    groups = load_groups(prefix)
    candidate = groups.grouping.candidate
    assert candidate is not None and candidate.any(), "the tiny model must give the test something to test"
    assert not (candidate & groups.grouping.inferred).any()
    assert groups.meta["grouping"]["candidate"] == {"levels": list(splits.CANDIDATE_LEVELS), "band": True, "k": 1.5,
                                                    "size": int(candidate.sum())}
    model = load_model(model_dir)
    seen = {}
    real_draw = train.draw_batch

    def record(inputs, grouping, scheduler, config, rank, step, posterior=None):
        seen[step] = grouping.sampling.clone(), posterior.temperature
        return real_draw(inputs, grouping, scheduler, config, rank, step, posterior)

    def batches_drawn(first_split: range, both_splits: range) -> bool:
        """From the groups' sampler and the exact shift, then from both splits' and the tempered shift."""
        trained = splits.trained_splits(test, 20)  # the refined split and the joint rows
        raked = splits.with_second_split(groups.grouping, torch.arange(20) // 10, *trained).sampling
        return (sorted(seen) == list(first_split) + list(both_splits)
                and all(torch.equal(seen[s][0], groups.grouping.sampling) and seen[s][1] == 1.0 for s in first_split)
                and all(torch.equal(seen[s][0], raked) and seen[s][1] == splits.FINETUNE_TEMPERATURE == 2.0
                        for s in both_splits))

    monkeypatch.setattr(train, "draw_batch", record)
    monkeypatch.setattr(splits.AttributeTest, "second_attribute", property(lambda self: True))  # whatever the ratio
    cfg = train.TrainConfig(steps=10, batch_size=4, checkpoint_every=4, show_progress=False, calibrate=False)
    straight = train.train_adapter(model, data, groups, tmp / "split-straight", cfg)
    manifest = json.loads((straight / "adapter.json").read_text())
    test = manifest["second_split"]
    assert test["second_attribute"] and test["candidate_size"] == int(candidate.sum()) and test["rows"] == 20
    assert test["finetune_steps"] == manifest["finetune_steps"] == 3 and test["finetune_temperature"] == 2.0
    # the fine-tune's second split is the refined candidate: outside the first split, as many rows a prompt as the
    # candidate keeps once cleaned (at most the candidate's), listed in the record
    refined = splits.recorded_rows(test, 20)
    assert test["refined_rounds"] == 1 and 0 < test["refined_size"] == int(refined.sum()) == len(test["refined_rows"])
    assert not (refined & groups.grouping.inferred).any()
    joint = splits.recorded_rows(test, 20, "joint_rows")  # the first split's rows read as the refined split
    assert test["joint_fraction"] == splits.JOINT_FRACTION and not (joint & ~groups.grouping.inferred).any()
    assert all(int(refined[p * 10:(p + 1) * 10].sum()) <= int(candidate[p * 10:(p + 1) * 10].sum()) for p in (0, 1))
    assert batches_drawn(range(10), range(10, 13))  # the fine-tune's batches (seeds 10-12) come from both splits
    # a crash in the fine-tune resumes from the checkpoint written after the test, which is read, not re-run
    crash_at(monkeypatch, 11, lambda: train.train_adapter(model, data, groups, tmp / "split-resumed", cfg))
    assert not (tmp / "split-resumed").exists()
    monkeypatch.setattr(splits, "attribute_test", None)
    seen.clear()
    resumed = train.train_adapter(model, data, groups, tmp / "split-resumed", dataclasses_replace(cfg, resume=True))
    manifest = json.loads((resumed / "adapter.json").read_text())
    assert manifest["resumed_from_step"] == 10 and manifest["second_split"] == test
    assert batches_drawn(range(0), range(10, 13))
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    # "more of the first": the test is recorded, nothing is fine-tuned: the weights are those of a run without it
    monkeypatch.setattr(splits.AttributeTest, "second_attribute", property(lambda self: False))
    off = train.train_adapter(model, data, groups, tmp / "split-off", cfg)
    record_off = json.loads((off / "adapter.json").read_text())["second_split"]
    assert not record_off["second_attribute"] and record_off["finetune_steps"] == 0
    assert record_off["excess_second"] == test["excess_second"]
    plain = train.train_adapter(model, data, groups, tmp / "split-none", dataclasses_replace(cfg, second_split=False))
    assert json.loads((plain / "adapter.json").read_text())["second_split"] is None
    c = load_file(str(plain / "adapter.safetensors"))
    assert all(torch.equal(load_file(str(off / "adapter.safetensors"))[k], c[k]) for k in c)
    assert any(not torch.equal(a[k], c[k]) for k in c)  # the fine-tune moved the weights


@pytest.mark.slow
def test_groups_bytes_do_not_depend_on_who_filled_the_latent_cache(setup, tmp_path, monkeypatch):
    """The VAE's latents are cached by the first command that needs them; their batches are fixed by the image size
    (`cache.ENCODE_PIXELS`), so `groups --batch-size 8` on a cold cache and on one filled by `groups --batch-size
    256` write the same groups (the encoder rounds differently at other batch sizes: 1e-7 in the latents)."""
    model, data, _ = setup

    def groups(cache: str, batch: str) -> str:
        monkeypatch.setenv("INVDIFF_CACHE_DIR", str(tmp_path / cache))
        r = _invoke("groups", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "g"),
                    "--batch-size", batch, "--draws", "2", "--grid-samples", "12")
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / "g.json").read_text())["tensors_sha256"]

    cold = groups("cold", "8")
    groups("filled", "256")
    assert groups("filled", "8") == cold


@pytest.mark.slow
def test_a_diverged_or_interrupted_training_leaves_no_adapter_and_keeps_its_checkpoint(setup, monkeypatch):
    """A non-finite loss stops the run before its next checkpoint; an adapter is put in place only once calibrated
    (an interrupted calibration keeps the checkpoint); a damaged checkpoint is one line."""
    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.method import train
    from invdiff_rt.method.adapter import write_adapter
    from invdiff_rt.models.loader import load_model

    model_dir, data, tmp = setup
    model = load_model(model_dir)
    cfg = train.TrainConfig(recipe="paper", oracle_column="color", steps=4, batch_size=4, checkpoint_every=2,
                            show_progress=False)
    real_step = train._train_step

    def nan_at_3(accelerator, run_, config, step, first, prepared):
        out = real_step(accelerator, run_, config, step, first, prepared)
        return {**out, "loss": float("nan")} if step == 3 else out

    monkeypatch.setattr(train, "_train_step", nan_at_3)
    with pytest.raises(InvdiffError, match=r"the loss is nan at step 4 \(training diverged\); rerun with a lower "
                                           r"--lr and without --resume"):
        train.train_adapter(model, data, None, tmp / "diverged", cfg)
    monkeypatch.setattr(train, "_train_step", real_step)
    assert not (tmp / "diverged").exists()
    assert json.loads((tmp / "diverged.ckpt" / "state.json").read_text())["step"] == 2

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_calibrate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train_adapter(model, data, None, tmp / "diverged", dataclasses_replace(cfg, resume=True))
    monkeypatch.undo()
    assert not (tmp / "diverged").exists() and (tmp / "diverged.ckpt" / "state.json").exists()
    assert not list(tmp.glob(".diverged.*"))  # the staged folder is removed
    state = tmp / "diverged.ckpt" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(InvdiffError, match=r"diverged.ckpt: damaged checkpoint \(\w+\); delete it to start over"):
        train.train_adapter(model, data, None, tmp / "diverged", dataclasses_replace(cfg, resume=True))

    adapter = train.GuidanceAdapter(train.config_for_unet(model.unet))
    torch.nn.init.constant_(adapter.conv_out.weight, float("nan"))
    with pytest.raises(InvdiffError, match=r"adapter weight conv_out.weight is not finite \(training diverged\)"):
        write_adapter(adapter, tmp, {"base_fingerprint": "x"})
    assert not (tmp / "adapter.json").exists()


@pytest.mark.slow
def test_oracle_shares_from_a_base_report(setup, monkeypatch):
    """--oracle-shares-from: the base's per-prompt majority shares from an eval report (clamped to 0.5/n..1-0.5/n)
    become the target's prior and adapter.json records them; a report that is not of this base and data on the oracle
    column, or is malformed, is refused in one line before anything is written."""
    from invdiff_rt.data.folder import data_fingerprint
    from invdiff_rt.method import train
    from invdiff_rt.models.loader import load_model

    model, data, tmp = setup
    report = {"attribute": "color", "n_per_prompt": 8,
              "settings": {"model_fingerprint": load_model(model).fingerprint, "adapter_fingerprint": None,
                           "data_fingerprint": data_fingerprint(data, "train"), "guidance_scale": 3.0},
              "per_prompt": {PROMPTS[0]: {"majority_share": 0.875}, PROMPTS[1]: {"majority_share": 1.0}}}
    (tmp / "base.json").write_text(json.dumps(report))
    base = ["train", "--model", str(model), "--data", str(data), "--steps", "2", "--batch-size", "4"]
    priors, build = [], train.Posterior.build.__func__
    monkeypatch.setattr(train.Posterior, "build", classmethod(
        lambda cls, *args: priors.append(args[3] if len(args) > 3 else None) or build(cls, *args)))
    outs = {}
    for name, extra in (("plain", []), ("prior", ["--oracle-shares-from", str(tmp / "base.json")])):
        r = _invoke(*base, "--oracle-groups-from", "color", "--from-t", "500", "--out", str(tmp / name), *extra)
        assert r.exit_code == 0, r.output
        outs[name] = json.loads((tmp / name / "adapter.json").read_text())
    # 2 of each prompt's 10 rows are its minority: prompt 0 drawn at 0.875 -> 0.125 / 0.2 and 0.875 / 0.8; prompt 1
    # at 1.0, clamped to 1 - 0.5 / 8 -> 0.0625 / 0.2 and 0.9375 / 0.8
    assert priors[0] is None and sorted({round(float(v), 6) for v in priors[-1]}) == [0.3125, 0.625, 1.09375, 1.171875]
    recorded = outs["prior"]["sampler_prior"]
    assert recorded["source"] == "oracle:color" and list(recorded["by_attribute"]) == ["color"]
    assert recorded["by_attribute"]["color"]["majority_share"] == {PROMPTS[0]: 0.875, PROMPTS[1]: 1 - 0.5 / 8}
    assert recorded["by_attribute"]["color"]["guidance_scale"] == 3.0
    assert "sampler_prior" not in outs["plain"] and outs["plain"]["weights_sha256"] != outs["prior"]["weights_sha256"]
    settings, shares = report["settings"], report["per_prompt"]
    wrong = {"a report of an adapter's samples": {"settings": {**settings, "adapter_fingerprint": "ab"}},
             "a report on attribute 'shape'": {"attribute": "shape"},
             "a report of another base model": {"settings": [1]},
             "a report on other data": {"settings": {**settings, "data_fingerprint": "ef"}},
             "a report without a majority_share in 0..1 for every prompt": {"per_prompt": {PROMPTS[0]: {}}},
             "a report without a positive n_per_prompt": {"n_per_prompt": "8"},
             "a report without its guidance_scale": {"settings": {**settings, "guidance_scale": None}}}
    bad_shares = ([{**shares, PROMPTS[1]: {"majority_share": v}} for v in ("0.9", None, float("nan"), 1.5, True)]
                  + [[1, 2], {**shares, PROMPTS[1]: 0.5}])
    cases = [(message, {**report, **change}) for message, change in wrong.items()]
    cases += [("a report without a majority_share in 0..1 for every prompt", {**report, "per_prompt": bad})
              for bad in bad_shares]
    for i, (message, bad) in enumerate(cases):
        path = tmp / f"report_{i}.json"
        path.write_text(json.dumps(bad))
        r = _invoke(*base, "--oracle-groups-from", "color", "--out", str(tmp / "refused"), "--oracle-shares-from",
                    str(path))
        assert str(r.exception).startswith(f"--oracle-shares-from {path}: {message}; "), (message, r.output)
    r = _invoke(*base, "--out", str(tmp / "refused"), "--oracle-shares-from", str(tmp / "base.json"))
    assert str(r.exception).startswith("--oracle-shares-from: needs --oracle-groups-from")
    r = _invoke(*base, "--recipe", "erm", "--target", "rb", "--oracle-groups-from", "color", "--out",
                str(tmp / "refused"), "--oracle-shares-from", str(tmp / "base.json"))
    assert str(r.exception).startswith("--oracle-shares-from: needs --oracle-groups-from"), r.output
    r = _invoke(*base, "--oracle-groups-from", "color", "--out", str(tmp / "refused"), "--oracle-shares-from",
                str(tmp / "base.json"), "--oracle-shares-from", str(tmp / "base.json"))
    assert str(r.exception).startswith("--oracle-shares-from: 2 report(s) for 1 --oracle-groups-from column(s)")
    r = _invoke(*base, "--oracle-groups-from", "color", "--target", "noise", "--out", str(tmp / "refused"),
                "--oracle-shares-from", str(tmp / "base.json"))
    assert str(r.exception).startswith("--oracle-shares-from: target noise has no posterior to shift")
    r = _invoke(*base, "--oracle-groups-from", "nope", "--out", str(tmp / "refused"))
    assert str(r.exception).startswith('--oracle-groups-from nope: ') and 'missing column "nope"' in str(r.exception)
    assert not (tmp / "refused").exists()


@pytest.mark.slow
def test_shares_from_samples(setup, monkeypatch):
    """--shares-from samples: the target's prior is `sampler_prior` on the reader's flags with the majority shares
    the readers leave on the base's own samples; adapter.json records both; refused beside --oracle-shares-from and
    without a posterior target, before anything is written; --shares-per-prompt sets the samples read, and is
    refused without --shares-from samples."""
    from invdiff_rt.method import drawn, train

    model, data, tmp = setup
    priors, build, reads, real_read = [], train.Posterior.build.__func__, [], drawn.drawn_majority
    monkeypatch.setattr(train.Posterior, "build", classmethod(
        lambda cls, *args: priors.append(args[3]) or build(cls, *args)))
    monkeypatch.setattr(drawn, "drawn_majority", lambda *args: reads.append(real_read(*args)) or reads[-1])
    base = ["train", "--model", str(model), "--data", str(data), "--steps", "2", "--batch-size", "4",
            "--oracle-groups-from", "color", "--from-t", "500"]
    r = _invoke(*base, "--shares-from", "samples", "--shares-per-prompt", "8", "--out", str(tmp / "samples"))
    assert r.exit_code == 0, r.output
    recorded = json.loads((tmp / "samples" / "adapter.json").read_text())["sampler_prior"]
    assert recorded["source"] == "samples" and recorded["per_prompt"] == 8 and recorded["guidance_scale"] == 3.0
    assert list(recorded["majority_share"].values()) == reads[0] and len(reads) == 1
    assert {v * 8 % 1 for v in reads[0]} <= {0.0, 0.5}  # shares of 8 samples, or the 0.5/n clamp
    for p, prompt in enumerate(PROMPTS):  # each row at (1 - q) / pi or q / (1 - pi), pi the reader's minority share
        q, pi = recorded["majority_share"][prompt], 1 - recorded["data_majority_share"][prompt]
        assert 0 < pi < 1  # the reader flags some of the prompt's rows (here its 2 minority rows)
        want = {round((1 - q) / pi, 5), round(q / (1 - pi), 5)}
        assert {round(float(v), 5) for v in priors[-1][p * 10:(p + 1) * 10]} == want, (prompt, q, pi)
    refusals = {"--shares-from samples: --oracle-shares-from gives the drawn shares already":
                ["--oracle-shares-from", str(tmp / "any.json")],
                "--shares-from samples: recipe paper with target noise has no groups' posterior": ["--recipe",
                                                                                                   "paper"],
                "--shares-per-prompt: only --shares-from samples reads base samples": ["--shares-from", "data"]}
    (tmp / "any.json").write_text("{}")
    for message, extra in refusals.items():
        r = _invoke(*base, "--shares-from", "samples", "--shares-per-prompt", "8", "--out", str(tmp / "refused"),
                    *extra)
        assert str(r.exception).startswith(message), r.output
    assert not (tmp / "refused").exists()


@pytest.mark.slow
def test_oracle_shares_from_two_reports(setup, monkeypatch):
    """Two oracle columns, one base report each (matched by attribute, in any order): each row's prior is the
    product of its two attributes' weights; a missing column's report is refused in one line."""
    from invdiff_rt.data.folder import data_fingerprint
    from invdiff_rt.method import train
    from invdiff_rt.models.loader import load_model

    model, data, tmp = setup
    data2 = tmp / "data_two"
    shutil.copytree(data, data2)
    lines = [json.loads(x) for x in (data2 / "train" / "metadata.jsonl").read_text().splitlines()]
    for row in lines:  # rows 4-6 of each prompt thick: 3 of its 10
        row["stroke"] = "thick" if int(row["file_name"].split("_")[1][:-4]) in (4, 5, 6) else "thin"
    (data2 / "train" / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    settings = {"model_fingerprint": load_model(model).fingerprint, "adapter_fingerprint": None,
                "data_fingerprint": data_fingerprint(data2, "train"), "guidance_scale": 3.0}
    for column, shares in (("color", (0.875, 1.0)), ("stroke", (0.75, 0.5))):
        (tmp / f"two_{column}.json").write_text(json.dumps({
            "attribute": column, "n_per_prompt": 8, "settings": settings,
            "per_prompt": {p: {"majority_share": q} for p, q in zip(PROMPTS, shares)}}))
    priors, build = [], train.Posterior.build.__func__
    monkeypatch.setattr(train.Posterior, "build", classmethod(
        lambda cls, *args: priors.append(args[3]) or build(cls, *args)))
    base = ["train", "--model", str(model), "--data", str(data2), "--steps", "2", "--batch-size", "4",
            "--oracle-groups-from", "color,stroke", "--from-t", "500"]
    r = _invoke(*base, "--out", str(tmp / "two"), "--oracle-shares-from", str(tmp / "two_stroke.json"),
                "--oracle-shares-from", str(tmp / "two_color.json"))
    assert r.exit_code == 0, r.output
    # colour (rows 0-1 minority, pi 0.2): prompt 0 0.125 / 0.2 and 0.875 / 0.8, prompt 1 (clamped 0.9375) 0.0625 / 0.2
    # and 0.9375 / 0.8; stroke (rows 4-6, pi 0.3): prompt 0 0.25 / 0.3 and 0.75 / 0.7, prompt 1 0.5 / 0.3 and 0.5 / 0.7;
    # each prompt's products (2 rows colour-minority, 3 stroke-minority, 5 neither) rescaled to mean 1
    expected = []
    for (c_min, c_maj), (s_min, s_maj) in (((0.625, 1.09375), (0.25 / 0.3, 0.75 / 0.7)),
                                           ((0.3125, 1.171875), (0.5 / 0.3, 0.5 / 0.7))):
        values = [c_min * s_maj, c_maj * s_min, c_maj * s_maj]
        mean = (2 * values[0] + 3 * values[1] + 5 * values[2]) / 10
        expected += [v / mean for v in values]
    assert sorted({round(float(v), 5) for v in priors[-1]}) == sorted(round(v, 5) for v in expected)
    recorded = json.loads((tmp / "two" / "adapter.json").read_text())["sampler_prior"]
    assert recorded["source"] == "oracle:color,stroke" and list(recorded["by_attribute"]) == ["color", "stroke"]
    assert recorded["by_attribute"]["stroke"]["majority_share"] == dict(zip(PROMPTS, (0.75, 0.5)))
    r = _invoke(*base, "--out", str(tmp / "refused"), "--oracle-shares-from", str(tmp / "two_color.json"),
                "--oracle-shares-from", str(tmp / "two_color.json"))
    assert str(r.exception).startswith("--oracle-shares-from: no report on attribute stroke; "), r.output
    r = _invoke(*base, "--out", str(tmp / "refused"), "--oracle-shares-from", str(tmp / "two_color.json"))
    assert str(r.exception).startswith("--oracle-shares-from: 1 report(s) for 2 --oracle-groups-from column(s)")
    assert not (tmp / "refused").exists()


@pytest.mark.slow
def test_groups_and_train_refuse_what_cannot_act(setup):
    from invdiff_rt.commands.method import calibrate
    from invdiff_rt.method.grouper import group_diagnostics
    from invdiff_rt import validate

    model, data, tmp = setup
    base = ["--model", str(model), "--data", str(data)]
    (tmp / "gd" / "X.json").mkdir(parents=True)
    r = _invoke("groups", *base, "--out", str(tmp / "gd" / "X"))
    assert "gd/X.json is a folder, so the groups cannot be written there" in str(r.exception)
    assert sorted(p.name for p in (tmp / "gd").iterdir()) == ["X.json"]
    r = _invoke("groups", *base, "--out", str(tmp / "gd"))  # a folder: PREFIX.json would land beside it
    assert f"--out {tmp / 'gd'}: is a folder; pass a file prefix, e.g. {tmp / 'gd' / 'groups'}" in str(r.exception)
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("gd")) == ["gd"]  # (exit 2: main() maps it)
    cases = {("groups", "--recipe", "paper", "--outlier-k", "9"): "--outlier-k: only for --recipe invdiff-rt",
             ("groups", "--recipe", "paper", "--independent-draws"): "--independent-draws: only for --recipe",
             ("groups", "--oracle-groups-from", "color", "--groups", "5"): "--groups 5: oracle groups are the",
             ("train", "--recipe", "erm", "--lambda", "50"): "--lambda 50: the erm recipe has one group",
             ("calibrate", "--groups", str(tmp / "nope" / "G"), "--adapter", str(tmp)):
                 "--groups " + str(tmp / "nope" / "G") + ": " + str(tmp / "nope" / "G.json") + " not found"}
    for (command, *args), message in cases.items():
        r = _invoke(command, *base, *args, *(["--out", str(tmp / "refused")] if command != "calibrate" else []))
        assert message in str(r.exception), (args, r.output)
    assert not (tmp / "refused").exists() and not (tmp / "refused.json").exists()
    r = _invoke("groups", *base, "--out", str(tmp / "refused"), "--report-attribute", "nope")
    assert str(r.exception).startswith('--report-attribute nope: ') and 'missing column "nope"' in str(r.exception)
    assert "loss profile" not in r.output  # refused before the UNet runs
    assert "--adapter" in [p.flag for p in validate.output_params("calibrate", calibrate)]  # locked while updated

    none = torch.zeros(20, dtype=torch.bool)
    assert group_diagnostics(torch.rand(20), none, torch.ones(20, 2), torch.ones(20), none)["auroc"] is None
    prefix = tmp / "g-none" / "G"
    r = _invoke("groups", *base, "--out", str(prefix), "--outlier-k", "1e6", "--batch-size", "8", "--grid-samples",
                "12")
    assert r.exit_code == 0 and "WARNING: no row was inferred as a minority" in r.output, r.output
    r = _invoke("train", *base, "--groups", str(prefix), "--out", str(tmp / "refused"), "--steps", "2")
    assert "--groups: no row of the 20 was inferred as a minority" in str(r.exception)
    assert not (tmp / "refused").exists()


@pytest.mark.parametrize("edit", [lambda m: {**m, "step": "x"}, lambda m: {**m, "step": -5},
                                  lambda m: {k: v for k, v in m.items() if k != "lr_scheduler"},
                                  lambda m: {**m, "lr_scheduler": 5}])
def test_a_hand_edited_checkpoint_state_is_a_damaged_checkpoint(tmp_path, edit):
    """state.json's step and LR schedule were read outside the damaged-checkpoint guard: a ValueError, KeyError or
    AttributeError on `train --resume`, and a step of -5 resumed."""
    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.method import train
    from invdiff_rt.method.adapter import AdapterConfig, GuidanceAdapter

    def parts():
        adapter = GuidanceAdapter(AdapterConfig(cross_attention_dim=16, width=8, depth=1, time_dim=16))
        return (adapter, *train._make_optimizer(adapter, train.TrainConfig(steps=10)))

    ckpt = tmp_path / "a.ckpt"
    train.save_checkpoint(ckpt, 3, "k", *parts())
    assert train.load_checkpoint(ckpt, "k", *parts())[0] == 3
    state = ckpt / "state.json"
    state.write_text(json.dumps(edit(json.loads(state.read_text()))))
    with pytest.raises(InvdiffError, match=r"a.ckpt: damaged checkpoint \(\w+\); delete it to start over$"):
        train.load_checkpoint(ckpt, "k", *parts())


def test_the_invdiff_rt_recipe_refuses_paper_groups_by_name(monkeypatch):
    """Groups of `invdiff groups --recipe paper` flag no row, so `train` said "rerun with a lower --outlier-k", a
    flag paper groups refuse."""
    from types import SimpleNamespace

    import torch

    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.method import train
    from invdiff_rt.method.grouper import Grouping, GroupsResult

    monkeypatch.setattr(train, "check_groups_match", lambda groups, inputs: None)
    grouping = Grouping(torch.ones(4, 2), torch.zeros(4), torch.ones(4), torch.zeros(4, dtype=torch.bool))
    inputs = SimpleNamespace(latents=torch.zeros(4, 1))
    with pytest.raises(InvdiffError, match=r"^--groups: made by `invdiff groups --recipe paper`; the invdiff-rt "
                                           r"recipe trains on `--recipe invdiff-rt` groups"):
        train._resolve_grouping(GroupsResult(grouping, {"recipe": "paper"}), inputs, None, train.TrainConfig())
    with pytest.raises(InvdiffError, match="lower --outlier-k"):  # its own groups, no row flagged
        train._resolve_grouping(GroupsResult(grouping, {"recipe": "invdiff-rt"}), inputs, None, train.TrainConfig())
