"""Issue 12: one regression test per failure found by trying the CLI as a new user, plus data hygiene.

Every bad input must end as one stderr line with exit code 2, before anything is written.
"""

from __future__ import annotations

import io
import json
import struct
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from invdiff_rt import cli
from invdiff_rt.artifacts import output_lock
from invdiff_rt.data.folder import MAX_PIXELS, load_images, read_split
from invdiff_rt.errors import InvdiffError

PROMPT = "a photo of the digit 1"


def _cli(monkeypatch, capsys, *argv) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["invdiff", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return e.value.code, err


def _generate(model, out, *extra):
    return ["generate", "--model", model, "--prompt", PROMPT, "--num", "1", "--steps", "2", "--out", out, *extra]


# ---------------------------------------------------------------- the "Why" list, one test each

def test_typer_usage_errors_are_one_line(monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "eval", "--model", "colored-digits")
    assert code == 2 and "--data" in err
    code, err = _cli(monkeypatch, capsys, "generate", "--out", "x", "--num", "abc")
    assert code == 2 and "--num" in err


@pytest.mark.parametrize("flag,value", [("--guidance-scale", "nan"), ("--guidance-scale", "inf"),
                                        ("--adapter-weight", "nan"), ("--adapter-weight", "-inf")])
def test_nonfinite_guidance_or_weight_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys, flag, value):
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "out", flag, value))
    assert code == 2 and flag in err and "finite" in err
    assert not (tmp_path / "out").exists()


def test_steps_zero_is_refused_before_run_json(tiny_model_dir, tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "out", "--steps", "0"))
    assert code == 2 and "--steps 0: must be at least 1" in err
    assert not (tmp_path / "out").exists()


def _foreign_adapter(folder: Path) -> Path:
    """A tiny adapter saved for another base (fingerprint aaaa...)."""
    from invdiff_rt.method.adapter import AdapterConfig, GuidanceAdapter, save_adapter

    adapter = GuidanceAdapter(AdapterConfig(cross_attention_dim=16, width=8, depth=1, time_dim=16))
    return save_adapter(adapter, folder, {"base_fingerprint": "a" * 64, "recipe": "erm", "lambda": 0.0})


def test_a_refused_adapter_is_the_only_stderr_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The model loads before the adapter is checked; the loading progress bar of transformers stays off stderr."""
    _foreign_adapter(tmp_path / "ad")
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "out", "--adapter", tmp_path / "ad"))
    assert code == 2 and "trained for base aaaaaaaaaaaa" in err
    assert not (tmp_path / "out").exists()


def test_a_manifest_that_is_not_a_json_object_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _foreign_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter.json").write_text("[1, 2]\n")  # valid JSON, not an object: was an AttributeError
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "out", "--adapter", tmp_path / "ad"))
    assert code == 2 and ("adapter.json: adapter manifest is not a JSON object (got list); retrain with `invdiff "
                          "train`") in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_json_saved_as_utf16_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Notepad's "Unicode" (UTF-16) reached a UnicodeDecodeError traceback."""
    _foreign_adapter(tmp_path / "ad")
    manifest = tmp_path / "ad" / "adapter.json"
    manifest.write_bytes(manifest.read_text().encode("utf-16"))
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "out", "--adapter", tmp_path / "ad"))
    assert code == 2 and f"{manifest}:1: not UTF-8 text (byte 0xff); save it as UTF-8" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "config": {**m["config"], "width": 4}}, "does not fit adapter.safetensors; restore"),
    (lambda m: {**m, "config": None}, "its config None does not fit adapter.safetensors"),
    (lambda m: {**m, "base_fingerprint": None}, "trained for base None, got"),  # the base check
])
def test_a_hand_edited_adapter_json_that_passes_the_field_check_is_one_line(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys, edit, message):
    """A config the weights do not fit reached load_state_dict's 70-line size mismatch; a null fingerprint a
    TypeError while the refusal was being written."""
    _foreign_adapter(tmp_path / "ad")
    manifest = tmp_path / "ad" / "adapter.json"
    record = json.loads(manifest.read_text())
    from invdiff_rt.models.loader import model_fingerprint

    record["base_fingerprint"] = model_fingerprint(Path(tiny_model_dir))  # this base's: the config is read next
    manifest.write_text(json.dumps(edit(record)))
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "out", "--adapter", tmp_path / "ad"))
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_model_missing_its_unet_weights_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """diffusers logged "An error occurred while trying to fetch ..." and more before the one-line error, which
    named the .bin file it looked for last; the folder without weights is named instead."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    code, err = _cli(monkeypatch, capsys, *_generate(model, tmp_path / "out"))
    assert code == 2 and err.strip() == f"error: --model {model}: unet/ holds no weights file (*.safetensors); copy " \
        "the folder whole from the checkpoint", err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file, key, value, message", [
    ("scheduler/scheduler_config.json", "num_train_timesteps", "x", "not a scheduler config diffusers builds"),
    ("scheduler/scheduler_config.json", "prediction_type", "sample2", "prediction_type 'sample2' is not one of"),
    ("unet/config.json", "sample_size", "x", "sample_size 'x' is not a positive int"),
    ("unet/config.json", "sample_size", None, "sample_size None is not a positive int"),
])
def test_a_hand_edited_model_config_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys, file, key, value,
                                                message):
    """Each reached a torch or diffusers traceback at the first sampling step, after run.json was written."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / file).read_text())
    (model / file).write_text(json.dumps({**config, key: value}))
    code, err = _cli(monkeypatch, capsys, *_generate(model, tmp_path / "out"))
    assert code == 2 and f"{model / file}: {message}" in err and "restore it from the checkpoint" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["groups", "--draws", "65"], "--draws 65: must be at most 64 (each draw is one more UNet pass over the data)"),
    (["calibrate", "--groups", "G", "--adapter", "A", "--pairs", "65"], "--pairs 65: must be at most 64"),
])
def test_draws_and_pairs_past_any_use_are_refused(tiny_model_dir, tmp_path, monkeypatch, capsys, argv, message):
    """`groups --draws 1000000000` ran until killed."""
    root = _dataset(tmp_path / "d", [{"file_name": "a.png", "text": PROMPT}], {"a.png": Image.new("RGB", (8, 8))})
    (tmp_path / "G.json").write_text("{}")
    (tmp_path / "G.safetensors").write_bytes(b"")
    (tmp_path / "A").mkdir()
    monkeypatch.chdir(tmp_path)
    code, err = _cli(monkeypatch, capsys, argv[0], "--model", tiny_model_dir, "--data", root, *argv[1:],
                     *(["--out", tmp_path / "g"] if argv[0] == "groups" else []))
    assert code == 2 and message in err, err
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--height", "1048576", "--width", "64"], "--height/--width 1048576x64: larger than 8192 px a side"),
    (["--batch-size", "100000000000"], "--batch-size 100000000000: must be at most 4096"),
    (["--adapter-weight", "1e300"], "--adapter-weight 1e+300: must be at most 100"),
])
def test_values_far_past_any_use_are_refused(tiny_model_dir, tmp_path, monkeypatch, capsys, argv, message):
    """A 1048576-px side reached the CPU allocator's traceback (and left run.json); a batch of 1e11 hung; a weight
    of 1e300 printed numpy's overflow warning before its error on the ONNX backends."""
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "out", *argv))
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_a_report_or_groups_output_never_replaces_an_artifacts_own_file(tmp_path):
    """`check --json EXPORT/manifest.json`, `--json DATA/train/metadata.jsonl` or `groups --out DATA/dataset`
    succeeded (exit 0) and the export, dataset or adapter was gone."""
    from invdiff_rt.validate import check_path

    for name in ("manifest.json", "metadata.jsonl", "adapter.safetensors"):
        (tmp_path / name).write_text("{}")
        with pytest.raises(InvdiffError, match=rf"^--json {tmp_path / name}: an artifact's own file \({name}\), "
                                               "which this would replace; pass a new file name$"):
            check_path("--json", "out_file", tmp_path / name)
    check_path("--json", "out_file", tmp_path / "report.json")  # new
    (tmp_path / "report.json").write_text("{}")
    check_path("--json", "out_file", tmp_path / "report.json")  # an earlier report: replaced
    (tmp_path / "dataset.json").write_text('{"recipe": "colored-digits"}')
    with pytest.raises(InvdiffError, match=rf"^--out {tmp_path / 'dataset'}: {tmp_path / 'dataset.json'} is not an "
                                           "invdiff-rt groups file and would be replaced; pass another prefix$"):
        check_path("--out", "out_prefix", tmp_path / "dataset")
    (tmp_path / "g.json").write_text('{"format": "invdiff-rt/groups"}')
    check_path("--out", "out_prefix", tmp_path / "g")  # a rerun of `groups`


def test_unknown_scheduler_leaves_no_run_json(tiny_model_dir, tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "out", "--scheduler", "bogus"))
    assert code == 2 and "--scheduler bogus" in err and "ddim" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision", ["fp8", "fp16", "bf16"])
def test_precision_the_torch_backend_cannot_honour_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                              precision):
    argv = _generate(tiny_model_dir, tmp_path / "out", "--backend", "torch", "--precision", precision)
    code, err = _cli(monkeypatch, capsys, *argv)
    assert code == 2 and f"--precision {precision}" in err
    assert not (tmp_path / "out").exists()


def test_bf16_is_not_an_export_precision(tiny_model_dir, tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "export", "--model", tiny_model_dir, "--out", tmp_path / "e", "--precision",
                     "bf16")
    assert code == 2 and "--precision bf16: an export is fp32 or fp16" in err and "--backend openvino" in err
    assert not (tmp_path / "e").exists()


def test_prompts_file_not_utf8_names_file_and_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a photo of the digit 1\n# comment\ncaf\xe9 latte\n")
    argv = ["generate", "--model", tiny_model_dir, "--prompts", prompts, "--out", tmp_path / "out"]
    code, err = _cli(monkeypatch, capsys, *argv)
    assert code == 2 and f"{prompts}:3: not UTF-8" in err and "0xe9" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, key", [({"addition_embed_type": "text_time"}, "addition_embed_type"),
                                       ({"in_channels": 9}, "in_channels"),
                                       ({"class_embed_type": "projection"}, "class_embed_type"),
                                       ({"num_class_embeds": 1000}, "num_class_embeds")])
def test_a_model_that_is_not_text_to_image_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys, edit, key):
    """SDXL, inpainting, unCLIP and upscaler UNets load but need inputs the pipeline does not give: refused up
    front."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = model / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    code, err = _cli(monkeypatch, capsys, *_generate(model, tmp_path / "out"))
    assert code == 2 and f"unet/config.json has {key}" in err and "text-to-image SD 1.x/2.x" in err
    assert not (tmp_path / "out").exists()


def test_a_no_cfg_export_samples_at_scale_1_and_refuses_another(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A --no-cfg export has no unconditional half: --guidance-scale 7.5 was recorded in run.json but not applied."""
    from invdiff_rt.cli import app
    from typer.testing import CliRunner

    from invdiff_rt.bench import fresh_adapter

    export, adapter = tmp_path / "e", fresh_adapter(str(tiny_model_dir), tmp_path / "adapter", 0)
    r = CliRunner().invoke(app, ["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out",
                                 str(export), "--no-cfg"])
    assert r.exit_code == 0, r.output
    argv = ["generate", "--export", export, "--backend", "onnxruntime", "--prompt", PROMPT, "--num", "1", "--steps",
            "2"]
    code, err = _cli(monkeypatch, capsys, *argv, "--out", tmp_path / "a", "--guidance-scale", "7.5")
    assert code == 2 and "--guidance-scale 7.5:" in err and "--no-cfg" in err and not (tmp_path / "a").exists()
    r = CliRunner().invoke(app, [*map(str, argv), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "run.json").read_text())["settings"]["guidance_scale"] == 1.0
    # the torch reference and a torch candidate of `check` run the no-CFG step too (the candidate ran the CFG one:
    # a shape error)
    r = CliRunner().invoke(app, ["check", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--export",
                                 str(export), "--backends", "torch,onnxruntime,torch", "--batch-sizes", "1", "--steps",
                                 "2"])
    assert r.exit_code == 0, r.output
    # bench would time half a UNet call a step against eager and torch rows that run both halves
    code, err = _cli(monkeypatch, capsys, "bench", "--export", export, "--backends", "onnxruntime", "--json",
                     tmp_path / "b.json")
    assert code == 2 and "exported with --no-cfg" in err and not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("argv", [["train", "--recipe", "erm", "--model", "MODEL", "--data", "DATA"],
                                  ["export", "--model", "MODEL"], ["pretrain", "--data", "DATA"],
                                  ["model", "build-sd"], ["data", "make", "colored-digits"],
                                  ["classifier", "train", "--data", "DATA", "--attribute", "color"]])
def test_an_artifact_never_replaces_a_folder_of_other_files(tiny_model_dir, tmp_path, monkeypatch, capsys, argv):
    """These outputs replace their folder whole (atomic rename): `classifier train --data D --out D` deleted the
    dataset. A folder with other files is refused before anything runs; one the command wrote is replaced."""
    from invdiff_rt import artifacts

    data, out = tmp_path / "data", tmp_path / "mine"
    data.mkdir()
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = [{"MODEL": tiny_model_dir, "DATA": data}.get(a, a) for a in argv]
    code, err = _cli(monkeypatch, capsys, *argv, "--out", out)
    assert code == 2 and f"--out {out}: holds other files" in err and "pass a new or empty folder" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(InvdiffError, match="holds other files"):  # the writer itself refuses too
        with artifacts.atomic_dir(out, "adapter.json"):
            pass
    (out / "adapter.json").write_text("{}")
    with artifacts.atomic_dir(out, "adapter.json") as tmp:
        (tmp / "adapter.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["adapter.json"]


@pytest.mark.parametrize("argv", [["eval", "--model", "colored-digits", "--data", "DATA", "--attribute", "color",
                                   "--per-prompt", "2", "--seed", "0", "--json", "OUT/r.json", "--grid", "OUT/grid"],
                                  ["bench", "--model", "colored-digits", "--json", "OUT/b.json", "--plot",
                                   "OUT/plot.svg"]])
def test_an_image_output_without_an_image_suffix_is_refused(tmp_path, monkeypatch, capsys, argv):
    """`eval --grid out/grid` failed after generating, in PIL ('unknown file extension: .tmp'), leaving out/."""
    argv = [a.replace("DATA", str(tmp_path)).replace("OUT", str(tmp_path / "out")) for a in argv]
    code, err = _cli(monkeypatch, capsys, *argv)
    assert code == 2 and "give a file name ending in .png" in err and not (tmp_path / "out").exists()


def test_out_below_a_regular_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, tmp_path / "afile" / "out"))
    assert code == 2 and "--out" in err and "is a file" in err
    assert (tmp_path / "afile").read_text() == "x"


def test_second_generate_on_the_same_out_refuses_while_the_first_runs(tiny_model_dir, tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "out"
    with output_lock(out):  # the first run holds the lock (a second open file description conflicts with it)
        code, err = _cli(monkeypatch, capsys, *_generate(tiny_model_dir, out))
    assert code == 2 and "another invdiff process" in err and "--out" in err
    assert not out.exists()


@pytest.mark.parametrize("second", ["OUT/b.png", "OUT/../out/b.png"])
def test_two_outputs_naming_one_path_are_refused(tmp_path, monkeypatch, capsys, second):
    """`bench --json X --plot X` blamed 'another invdiff process' (its own --json's lock)."""
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, "bench", "--model", "colored-digits", "--json", f"{out}/b.png",
                     "--plot", second.replace("OUT", str(out)))
    assert code == 2 and f"--plot {second.replace('OUT', str(out))}: the same path as --json; pass another" in err
    assert not out.exists()


def test_a_launcher_jobs_ranks_share_an_output_and_a_plain_process_is_refused(tmp_path, monkeypatch):
    """A plain `invdiff generate` on the --out of a running torchrun job was not refused (each rank locked its own
    key, the plain process another): it duplicated the ranks' work and could remove their temporaries."""
    out = tmp_path / "out"
    code = ("import time\nfrom invdiff_rt.artifacts import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(30)")
    rank1 = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "WORLD_SIZE": "2", "RANK": "1"})
    try:
        assert rank1.stdout.readline().strip() == "held"
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        with output_lock(out):  # the same job's other rank
            pass
        monkeypatch.setenv("RANK", "1")  # a second job's rank 1
        with pytest.raises(InvdiffError, match=rf"pid {rank1.pid}\)"):
            with output_lock(out):
                pass
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("RANK")
        with pytest.raises(InvdiffError, match=rf"^--out {out}: a launcher job's invdiff ranks are writing it"):
            with output_lock(out):  # a plain process
                pass
    finally:
        rank1.kill()
        rank1.wait()
    with output_lock(out):
        pass


def test_ranks_replace_run_json_one_at_a_time(tmp_path):
    """Two ranks replacing run.json at once each listed the files to remove and the last writer won, dropping the
    images the other had read from a part it then deleted: the step is taken in turns."""
    import threading

    from invdiff_rt.artifacts import taking_turns

    order = []

    def second():
        with taking_turns(tmp_path, "run.json"):
            order.append("second")

    with taking_turns(tmp_path, "run.json"):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]


def test_lock_is_held_across_processes_and_released(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom invdiff_rt.artifacts import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InvdiffError, match=rf"pid {holder.pid}\)"):
            with output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # the kernel dropped the dead holder's lock
        pass


# ---------------------------------------------------------------- data hygiene

def _dataset(root: Path, rows: list[dict], images: dict[str, Image.Image | bytes]) -> Path:
    split = root / "train"
    split.mkdir(parents=True)
    for name, image in images.items():
        if isinstance(image, bytes):
            (split / name).write_bytes(image)
        else:
            image.save(split / name)
    (split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but holds (almost) no data: what a decompression bomb shows
    before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_naming_file_and_line(tmp_path):
    ok = Image.new("RGB", (8, 8), (10, 20, 30))
    root = _dataset(tmp_path / "d", [{"file_name": "a.png", "text": PROMPT}, {"file_name": "bomb.png", "text": PROMPT}],
                    {"a.png": ok, "bomb.png": _png_header_only(60000, 60000)})
    with pytest.raises(InvdiffError, match=r"bomb\.png.*metadata line 2"):
        load_images(read_split(root))
    big = 4097  # over MAX_PIXELS, under PIL's own limit: refused by our check before decoding
    assert big * big > MAX_PIXELS
    root2 = _dataset(tmp_path / "d2", [{"file_name": "big.png", "text": PROMPT}], {"big.png": _png_header_only(big, big)})
    with pytest.raises(InvdiffError, match=r"big\.png: declares 4097x4097 pixels.*line 1"):
        load_images(read_split(root2))


def test_duplicate_file_name_is_refused(tmp_path):
    rows = [{"file_name": "a.png", "text": PROMPT}, {"file_name": "b.png", "text": PROMPT},
            {"file_name": "./a.png", "text": PROMPT}]
    root = _dataset(tmp_path / "d", rows, {"a.png": Image.new("RGB", (8, 8)), "b.png": Image.new("RGB", (8, 8))})
    with pytest.raises(InvdiffError, match=r"metadata\.jsonl:3: a\.png is already listed on line 1"):
        read_split(root)


def test_metadata_not_utf8_and_blank_text(tmp_path):
    root = _dataset(tmp_path / "d", [{"file_name": "a.png", "text": PROMPT}], {"a.png": Image.new("RGB", (8, 8))})
    meta = root / "train" / "metadata.jsonl"
    meta.write_bytes(meta.read_bytes() + b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(InvdiffError, match=r"metadata\.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        read_split(root)
    meta.write_text(json.dumps({"file_name": "a.png", "text": "  "}) + "\n")
    with pytest.raises(InvdiffError, match=r'metadata\.jsonl:1: "text" must be a non-empty string'):
        read_split(root)


def test_a_nan_attribute_value_names_its_line(tmp_path):
    """pandas writes NaN for a missing value: `data info` divided by zero, and a NaN matched no level."""
    from invdiff_rt.data.folder import attribute_values

    rows = [{"file_name": "a.png", "text": PROMPT, "color": "red"}, {"file_name": "b.png", "text": PROMPT,
                                                                        "color": float("nan")}]
    root = _dataset(tmp_path / "d", rows, {n: Image.new("RGB", (8, 8)) for n in ("a.png", "b.png")})
    records = read_split(root)
    with pytest.raises(InvdiffError, match=r'metadata\.jsonl:2: column "color" is nan, not a value; write null for '
                                           "a missing one or fix the line$"):
        attribute_values(records, "color")
    assert attribute_values(records[:1], "color") == ["red"]


def test_json_artifacts_with_a_byte_order_mark_read_and_other_encodings_or_folders_are_one_line(tmp_path):
    """Every manifest and record reader (`read_json`, `read_jsonl`) reads as metadata.jsonl does: a BOM is dropped,
    UTF-16 or Latin-1 is refused naming the line, a folder in the file's place is "unreadable"."""
    from invdiff_rt.artifacts import read_json, read_jsonl

    path = tmp_path / "run.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n')
    assert read_json(path) == {"a": 1}
    path.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(InvdiffError, match=r"run.json:2: not UTF-8 text \(byte 0xe9\); save it as UTF-8$"):
        read_jsonl(path)
    path.unlink()
    path.mkdir()
    for reader in (read_json, read_jsonl):
        with pytest.raises(InvdiffError, match=r"run.json: unreadable \(Is a directory\); check the file$"):
            reader(path)


def test_metadata_with_a_byte_order_mark_reads(tmp_path):
    root = _dataset(tmp_path / "d", [{"file_name": "a.png", "text": PROMPT}], {"a.png": Image.new("RGB", (8, 8))})
    meta = root / "train" / "metadata.jsonl"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes().replace(b"\n", b"\r\n"))
    [record] = read_split(root)
    assert record.text == PROMPT and record.file.name == "a.png"


def test_phone_photos_float_images_captions_and_names_as_users_have_them(tmp_path, caplog):
    """An EXIF-rotated JPEG is read upright (as viewers show it), a float image in [0, 1] is not black, a caption's
    surrounding spaces do not make another prompt, a name too long for the file system is one line."""
    from invdiff_rt.method.cache import _encode_size

    stored = Image.new("RGB", (16, 8), (255, 0, 0))  # stored 16 wide, 8 high; orientation 6: shown rotated (8x16)
    stored.paste((0, 0, 255), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes(), quality=100)
    images = {"phone.jpg": buffer.getvalue(), "float.tif": Image.fromarray(np.full((8, 16), 0.5, np.float32))}
    rows = [{"file_name": "phone.jpg", "text": PROMPT + " "}, {"file_name": "float.tif", "text": " " + PROMPT}]
    root = _dataset(tmp_path / "d", rows, images)
    records = read_split(root)
    assert [r.text for r in records] == [PROMPT, PROMPT]
    with caplog.at_level("WARNING"):
        x = load_images(records[:1])
    assert x.shape == (1, 3, 16, 8) and "1 turned upright by their EXIF orientation" in caplog.messages[0]
    assert round(float(x[0, 0, 0, 0]), 1) == -1.0 and round(float(x[0, 0, -1, 0]), 1) == 1.0  # blue top, red below
    grey = ((load_images(records[1:])[0, :, 0, 0] + 1) * 127.5).round().tolist()
    assert grey == [128.0, 128.0, 128.0]  # 0.5 of white, not 0.5/255
    model = type("M", (), {"image_size": 32, "size_multiple": 8})()
    assert _encode_size(model, records) == 32  # sizes differ (8x16 stored, 16x8): the model's, whatever comes first
    (root / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "x" * 300 + ".png", "text": PROMPT}))
    with pytest.raises(InvdiffError, match=r'metadata.jsonl:1: "file_name" is not a usable path \(File name too'):
        read_split(root)
    (root / "train" / "phone.jpg").write_bytes(b"")  # unreadable, and first: one line (was a traceback)
    with pytest.raises(InvdiffError, match=r"phone\.jpg: unreadable image .*metadata line 1"):
        _encode_size(model, records)


def test_other_modes_convert_to_rgb_and_sizes_resize(tmp_path, caplog):
    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert grey16.mode in ("I;16", "I")
    images = {"l.png": Image.new("L", (8, 8), 128), "rgba.png": Image.new("RGBA", (8, 8), (255, 0, 0, 0)),
              "p.png": Image.new("RGB", (8, 8), (0, 255, 0)).convert("P"), "g16.png": grey16,
              "big.png": Image.new("RGB", (16, 16), (0, 0, 255))}
    rows = [{"file_name": name, "text": PROMPT} for name in images]
    root = _dataset(tmp_path / "d", rows, images)
    with caplog.at_level("WARNING"):
        x = load_images(read_split(root), size=8)
    assert caplog.messages == [f"note: {root / 'train'}: 4 images converted to 8-bit RGB (I;16, L, P, RGBA), "
                               "1 resized to 8x8 (from 16x16), 0 turned upright by their EXIF orientation"]
    assert x.shape == (5, 3, 8, 8)
    pixels = ((x[:, :, 0, 0] + 1) * 127.5).round().tolist()
    assert pixels == [[128, 128, 128], [255, 0, 0], [0, 255, 0], [255, 255, 255], [0, 0, 255]]
    with pytest.raises(InvdiffError, match=r"big\.png: 16x16 pixels, but l\.png has 8x8 \(metadata line 5\)"):
        load_images(read_split(root))


def _click_modules():
    import click

    modules = [click]
    try:
        from typer import _click  # typer >= 0.29 ships its own copy of click

        modules.append(_click)
    except ImportError:
        pass
    return modules


@pytest.mark.parametrize("module", _click_modules(), ids=lambda m: m.__name__)
def test_usage_errors_of_either_click_copy_are_one_line(module, monkeypatch, capsys):
    def raise_usage_error(**kwargs):
        raise module.exceptions.BadParameter("not a number\nsecond line", param_hint="'--num'")

    monkeypatch.setattr(cli, "app", raise_usage_error)
    code, err = _cli(monkeypatch, capsys, "generate")
    assert code == 2 and err.startswith("error: Invalid value for '--num': not a number second line")


@pytest.mark.parametrize("argv,flag", [
    (["groups", "--model", "colored-digits", "--data", ".", "--out", "g", "--recipe", "erm"], "--recipe erm"),
    (["groups", "--model", "colored-digits", "--data", ".", "--out", "g", "--recipe", "paper", "--draws", "2"],
     "--draws"),
    (["groups", "--model", "colored-digits", "--data", ".", "--out", "g", "--groups", "3"], "--groups 3"),
    (["train", "--model", "colored-digits", "--data", ".", "--out", "a", "--recipe", "erm", "--groups", "p"],
     "--groups"),
    (["eval", "--model", "colored-digits", "--data", ".", "--attribute", "color", "--json", "r.json",
      "--per-prompt", "2", "--seed", "0", "--adapter-weight", "2"], "--adapter-weight"),
    (["data", "make", "colored-digits", "--out", "d", "--n-train", "10"], "--n-train"),
    (["generate", "--model", "colored-digits", "--export", ".", "--prompt", "x", "--out", "o"], "--model/--export"),
    (["generate", "--model", "colored-digits", "--backend", "openvino", "--prompt", "x", "--out", "o"],
     "--backend openvino: runs an export folder; pass --export DIR instead of --model"),
    (["generate", "--export", ".", "--backend", "torch", "--prompt", "x", "--out", "o"],
     "--backend torch: runs the model folder; pass --model instead of --export"),
])
def test_combinations_that_do_not_apply_are_refused(tmp_path, monkeypatch, capsys, argv, flag):
    (tmp_path / "p.json").write_text("{}")
    (tmp_path / "p.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, err = _cli(monkeypatch, capsys, *argv)
    assert code == 2 and f"error: {flag}" in err
    assert sorted(tmp_path.rglob("*")) == before


def test_artifacts_get_the_modes_plain_files_and_folders_get(tmp_path):
    """mkstemp/mkdtemp make temporaries 0600/0700: every manifest, adapter, export folder and generated PNG was
    unreadable to other users (a server reading the export). They get what open()/mkdir() give under the umask."""
    import os
    import stat

    from invdiff_rt import artifacts

    old = os.umask(0o022)
    try:
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    file = artifacts.atomic_write_json(tmp_path / "a.json", {"a": 1})
    with artifacts.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x.json").write_text("{}")
    weights = artifacts.atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # its own file
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(file) == mode(weights) == artifacts.FILE_MODE == 0o666 & ~artifacts._UMASK
    assert mode(tmp_path / "d") == artifacts.DIR_MODE == 0o777 & ~artifacts._UMASK
    if artifacts._UMASK == 0o022:
        assert (mode(file), mode(tmp_path / "d")) == (mode(tmp_path / "plain.txt"), mode(tmp_path / "plain"))


def test_an_artifact_out_that_is_a_link_or_holds_the_current_folder(tmp_path, monkeypatch, capsys):
    """A symbolic link is followed (its target replaced, the link kept; rmtree on the link raised OSError after
    the export was written); `--out .` was a ValueError ('has an empty name') after the work."""
    from invdiff_rt import artifacts

    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "adapter.json").write_text("{}")
    (tmp_path / "current").symlink_to("v1")
    with artifacts.atomic_dir(tmp_path / "current", "adapter.json") as tmp:
        (tmp / "adapter.json").write_text('{"new": 1}')
    assert (tmp_path / "current").is_symlink() and (tmp_path / "v1" / "adapter.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]
    monkeypatch.chdir(tmp_path / "v1")
    code, err = _cli(monkeypatch, capsys, "data", "make", "colored-digits", "--out", ".")
    assert code == 2 and "--out .: the output replaces the whole folder" in err
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["adapter.json"]
