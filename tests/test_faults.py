"""Faults: a full disk (ENOSPC injected into the artifact writers) and `kill -9` at a random moment of each stage.

After either, the previous artifact is intact, nothing corrupt sits where a later stage loads it, and running the
same command again gives the artifacts of an uninterrupted run (the same bytes where the stage is deterministic).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from invdiff_rt import artifacts, cli

PROMPTS = ["a photo of the digit 0", "a photo of the digit 1"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]


# ---------------------------------------------------------------- full disk

def _writers(tmp: Path):
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    return {
        "bytes": (tmp / "a.bin", lambda p: artifacts.atomic_write_bytes(p, b"new")),
        "json": (tmp / "a.json", lambda p: artifacts.atomic_write_json(p, {"new": 1})),
        "safetensors": (tmp / "a.safetensors",
                        lambda p: artifacts.atomic_save_safetensors({"w": torch.ones(3)}, p)),
        "png": (tmp / "a.png", lambda p: artifacts.atomic_save_image(image, p)),
    }


@pytest.mark.parametrize("kind", ["bytes", "json", "safetensors", "png"])
def test_enospc_in_an_atomic_write_keeps_the_previous_artifact(tmp_path, monkeypatch, kind):
    path, write = _writers(tmp_path)[kind]
    write(path)  # the previous artifact
    before = path.read_bytes()
    path.write_bytes(before)
    monkeypatch.setattr(artifacts.os, "fsync", _enospc)
    with pytest.raises(OSError) as e:
        write(path)
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and not _temporaries(tmp_path)


def test_enospc_while_building_a_folder_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "model"
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"old")
    with pytest.raises(OSError):
        with artifacts.atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"new, half")
            _enospc()
    assert _tree(target) == {"weights.bin": b"old"} and not _temporaries(tmp_path)


def test_enospc_in_a_manifest_append_cuts_the_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "manifest.jsonl"
    artifacts.append_jsonl(path, {"index": 0})
    before = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(artifacts.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError) as e:
        artifacts.append_jsonl(path, {"index": 1, "file": "x" * 40})
    assert e.value.errno == errno.ENOSPC and path.read_bytes() == before
    monkeypatch.undo()
    artifacts.append_jsonl(path, {"index": 2})
    assert [r["index"] for r in artifacts.read_jsonl(path)] == [0, 2]


def test_generate_on_a_full_disk_is_one_line_and_a_rerun_completes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    argv = ["invdiff", "generate", "--model", str(tiny_model_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--num", "3", "--steps", "2", "--batch-size", "1", "--no-grid"]
    monkeypatch.setattr(sys, "argv", argv + ["--out", str(tmp_path / "reference")])
    cli.main()
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_until_full(fd):
        calls["n"] += 1
        if calls["n"] > 5:  # run.json, then two images (PNG + manifest line each): then the disk is full
            _enospc()
        real_fsync(fd)

    out = tmp_path / "full"
    monkeypatch.setattr(sys, "argv", argv + ["--out", str(out)])
    monkeypatch.setattr(artifacts.os, "fsync", fsync_until_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()  # (after the model loader's progress bars)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 1 and len(errors) == 1 and "No space left on device" in errors[0]
    assert errors[0].startswith(f"error: --out {out}: No space")  # fsync's error names no file: the output does
    assert err.endswith(errors[0]) and "Traceback" not in err
    done = artifacts.read_jsonl(out / "manifest.jsonl")
    assert len(done) == 2 and all(artifacts.sha256_file(out / r["file"]) == r["sha256"] for r in done)
    monkeypatch.setattr(artifacts.os, "fsync", real_fsync)
    cli.main()
    assert _tree(out) == _tree(tmp_path / "reference") and not _temporaries(out)


@pytest.mark.parametrize("argv, named", [
    (["generate", "--prompt", "x", "--out=runs/a"], "--out runs/a"),
    (["eval", "--adapter", "ad", "--json", "r.json"], "--json r.json"),
    (["calibrate", "--adapter", "runs/ad", "--guidance-scale", "7.5"], "--adapter runs/ad"),  # its adapter.json
    (["bench", "--adapter", "runs/ad"], "output"),  # reads the adapter, writes nothing there
])
def test_a_write_without_a_file_name_names_the_output_flag(argv, named):
    assert cli._output_flag(argv) == named


# ---------------------------------------------------------------- kill -9 at a random moment, then the same command

def _dataset(root: Path, per_prompt: int = 8) -> Path:
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    lines = []
    for p, text in enumerate(PROMPTS):
        for i in range(per_prompt):
            color = ["red", "green"][p] if i >= 2 else ["green", "red"][p]
            img = np.zeros((32, 32, 3), np.uint8)
            img[6 + i % 4:24, 8:26, 0 if color == "red" else 1] = 200 + rng.integers(0, 50)
            Image.fromarray(img).save(root / "train" / f"{p}_{i}.png")
            lines.append(json.dumps({"file_name": f"{p}_{i}.png", "text": text, "color": color}))
    (root / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    from invdiff_rt.method.grouper import save_groups  # noqa: F401  (import check only)
    from invdiff_rt.models.tiny import save_random_model

    root = tmp_path_factory.mktemp("faults")
    # every digit's words: the demo's stage makes colored-digits data of all ten (unknown words are refused)
    model = save_random_model(root / "model", [f"a photo of the digit {d}" for d in range(10)], seed=0)
    data = _dataset(root / "data")
    groups = root / "groups"
    _run_to_end(["groups", "--model", str(model), "--data", str(data), "--out", str(groups), "--threads", "1",
                 "--grid-samples", "16", "--batch-size", "16"], root)
    adapter = root / "adapter"
    _run_to_end(["train", "--model", str(model), "--data", str(data), "--groups", str(groups), "--out", str(adapter),
                 "--steps", "2", "--batch-size", "4", "--threads", "1", *SMALL_CALIBRATION], root)
    assert json.loads((adapter / "adapter.json").read_text())["calibration"]["per_prompt"] == 8  # the flags reach it
    return {"model": model, "data": data, "groups": groups, "adapter": adapter, "root": root}


def _env(root: Path) -> dict:
    return {**os.environ, "INVDIFF_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _cmd(args: list[str]) -> list[str]:
    if args[0] == "demo-tiny":  # the demo's code path on the tiny model (the CLI's demo runs the shipped base)
        code = ("import sys\nfrom pathlib import Path\nfrom rich.console import Console\n"
                "from invdiff_rt.artifacts import output_lock\nfrom invdiff_rt.demo import DemoConfig, run_demo\n"
                "cfg = DemoConfig(model=sys.argv[2], per_prompt=2, generate_per_prompt=1, train_steps=4,\n"
                "                 bench_batch_sizes=(1,), bench_steps=2, bench_repeats=1, threads=1,\n"
                "                 calibrate_per_prompt=4, calibrate_min_samples=0)\n"
                "with output_lock(sys.argv[1]):\n    run_demo(Path(sys.argv[1]), cfg, console=Console(quiet=True))\n")
        return [sys.executable, "-c", code, *args[1:]]
    return [sys.executable, "-m", "invdiff_rt.cli", *args]


def _run_to_end(args: list[str], root: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(_cmd(args), env=_env(root), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - start


def _kill_at(args: list[str], root: Path, seconds: float, out: Path) -> float:
    """Start the command and SIGKILL it after `seconds`; if it finished first (a shared machine's speed varies),
    delete what it wrote (`killed*` next to the output) and start over with half the delay. -> the delay."""
    for _ in range(4):
        proc = subprocess.Popen(_cmd(args), env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seconds
        seconds /= 2
        for path in out.parent.glob(f"{out.name}*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    pytest.fail(f"{args[0]} always finished before the kill")


# the weight rule on 16 samples a tried weight, not 480: the same code path, minutes less on the tiny model
SMALL_CALIBRATION = ("--calibrate-per-prompt", "8", "--calibrate-min-samples", "0")


def _stage_args(stage: str, inp: dict, out: Path) -> list[str]:
    model, data = str(inp["model"]), str(inp["data"])
    return {
        "pretrain": ["pretrain", "--data", data, "--out", str(out), "--steps", "40", "--vae-steps", "20",
                     "--batch-size", "8", "--checkpoint-every", "5", "--threads", "1"],
        "groups": ["groups", "--model", model, "--data", data, "--out", str(out), "--threads", "1",
                   "--grid-samples", "16", "--batch-size", "16", "--draws", "4"],
        "train": ["train", "--model", model, "--data", data, "--groups", str(inp["groups"]), "--out", str(out),
                  "--steps", "40", "--batch-size", "8", "--checkpoint-every", "4", "--resume", "--threads", "1",
                  *SMALL_CALIBRATION],
        "export": ["export", "--model", model, "--adapter", str(inp["adapter"]), "--out", str(out)],
        "generate": ["generate", "--model", model, "--adapter", str(inp["adapter"]), "--prompt", PROMPTS[0],
                     "--prompt", PROMPTS[1], "--num", "6", "--steps", "4", "--batch-size", "2", "--out", str(out),
                     "--threads", "1"],
        "demo": ["demo-tiny", str(out), model],
    }[stage]


# What must be byte-identical to an uninterrupted run (timings and versions in the JSON records may differ).
SAME_BYTES = {
    "pretrain": ("**/*.safetensors",),
    "groups": ("*.safetensors",),
    "train": ("**/adapter.safetensors",),
    "export": ("**/*.onnx", "**/*.onnx.data", "**/*.data"),
    "generate": ("**/*.png", "manifest.jsonl"),
    "demo": ("adapter/**/*.safetensors", "generate/**/*.png", "export/**/*.onnx"),
}


def _same_bytes(stage: str, a: Path, b: Path) -> list[str]:
    files = sorted({str(p.relative_to(a)) for pattern in SAME_BYTES[stage] for p in a.glob(pattern) if p.is_file()})
    assert files, f"{stage}: nothing to compare under {a}"
    return [f for f in files if not (b / f).is_file() or (a / f).read_bytes() != (b / f).read_bytes()]


def _load(stage: str, out: Path, inp: dict) -> None:
    """What a later stage does with the artifact: it must load (raises otherwise)."""
    if stage == "pretrain":
        from invdiff_rt.models.loader import load_model

        load_model(out)
    elif stage == "groups":
        from invdiff_rt.method.grouper import load_groups

        load_groups(out)
    elif stage == "train":
        from invdiff_rt.method.adapter import load_adapter
        from invdiff_rt.models.loader import load_model

        load_adapter(out, load_model(inp["model"]))
    elif stage == "export":
        from invdiff_rt.export.manifest import read_manifest

        read_manifest(out)  # verifies every file's sha256
    elif stage in ("generate", "demo"):
        folder = out / "generate" if stage == "demo" else out
        for manifest in folder.rglob("manifest.jsonl"):
            for rec in artifacts.read_jsonl(manifest):
                assert artifacts.sha256_file(manifest.parent / rec["file"]) == rec["sha256"]


def _present(stage: str, out: Path) -> bool:
    return Path(f"{out}.json").is_file() if stage == "groups" else out.exists()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("stage", ["pretrain", "groups", "train", "export", "generate", "demo"])
def test_kill_9_at_a_random_moment_then_rerun_equals_uninterrupted(stage_inputs, tmp_path, stage):
    inp, root = stage_inputs, stage_inputs["root"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    seconds = _run_to_end(_stage_args(stage, inp, reference), root)
    moment = random.Random(os.environ.get("INVDIFF_KILL_SEED", stage)).uniform(0.45, 0.85) * seconds
    moment = _kill_at(_stage_args(stage, inp, killed), root, moment, killed)
    print(f"{stage}: uninterrupted {seconds:.1f} s, killed at {moment:.1f} s")  # shown with pytest -rP
    if _present(stage, killed):  # whatever the kill left where a later stage looks must load
        _load(stage, killed, inp)
    _run_to_end(_stage_args(stage, inp, killed), root)
    _load(stage, killed, inp)
    out_a, out_b = (reference, killed) if stage != "groups" else (tmp_path, tmp_path)
    if stage == "groups":
        assert Path(f"{reference}.safetensors").read_bytes() == Path(f"{killed}.safetensors").read_bytes()
    else:
        assert _same_bytes(stage, out_a, out_b) == [], f"{stage}: files differ after kill at {moment:.1f} s"
    assert not _temporaries(tmp_path), _temporaries(tmp_path)
