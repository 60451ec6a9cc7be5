"""`invdiff generate`: determinism across batch sizes, resume, kill -9 safety, rank sharding, settings guard, grids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from invdiff_rt.artifacts import read_jsonl
from invdiff_rt.errors import InvdiffError
from invdiff_rt.runtime import generate as gen

PROMPTS = ["a red digit", "a blue digit"]
FAST = dict(seed=3, steps=2, guidance_scale=2.0, adapter_weight=0.0, scheduler="ddim", progress=False)
REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from invdiff_rt.models.tiny import save_random_model

    return save_random_model(tmp_path_factory.mktemp("tiny") / "model", PROMPTS, seed=0)


@pytest.fixture(scope="module")
def loaded(model_dir):
    """(runtime, backend name, fingerprints) for the tiny model on the torch backend."""
    return gen.load_generation_runtime(model=model_dir, backend="torch")


def _run(loaded, out, **kw):
    runtime, name, fingerprints = loaded
    args = {**FAST, "num": 2, "batch_size": 2, **kw}
    return gen.run_generation(runtime, PROMPTS, out, backend=name, fingerprints=fingerprints, **args)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "invdiff_rt.cli", "generate", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _cli_args(model_dir, out, num, batch_size=2) -> list[str]:
    return ["--model", str(model_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num", str(num),
            "--batch-size", str(batch_size), "--seed", "3", "--steps", "2", "--guidance-scale", "2.0",
            "--backend", "torch", "--out", str(out)]


# ---------------------------------------------------------------- planning (no model)

def test_read_prompts_skips_blank_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\na cat\n\n  a dog  \n# a bird\n")
    assert gen.read_prompts(path) == ["a cat", "a dog"]


def test_read_prompts_from_a_windows_editor(tmp_path):
    """A UTF-8 byte-order mark and CRLF line ends (Notepad's UTF-8) are not part of the prompts."""
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa cat\r\na caf\u00e9\r\n".encode("utf-8"))
    assert gen.read_prompts(path) == ["a cat", "a caf\u00e9"]
    path.write_bytes("\ufeffa cat\nb\n".encode("utf-8") + b"caf\xe9\n")  # an error still names the file's line/byte
    with pytest.raises(InvdiffError, match=r"p.txt:3: not UTF-8 text \(byte 0xe9\)"):
        gen.read_prompts(path)


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_read_prompts_missing_or_empty_names_file(tmp_path, content):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvdiffError) as e:
        gen.read_prompts(path)
    assert str(path) in str(e.value) and "--prompts" in str(e.value) and "\n" not in str(e.value)


def test_plan_and_shard_are_disjoint_and_cover():
    jobs = gen.plan_jobs(["b", "a", "b"], 3)
    assert [j.key for j in jobs] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    shards = [gen.shard(jobs, r, 4) for r in range(4)]
    assert [len(s) for s in shards] == [2, 2, 1, 1]
    assert sorted(j for s in shards for j in s) == jobs
    assert gen.shard(list(reversed(jobs)), 1, 4) == shards[1]


def test_dist_env_and_slugs():
    assert gen.dist_env({}) == (0, 1)
    assert gen.dist_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert gen.dist_env({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"}) == (2, 3)
    with pytest.raises(InvdiffError, match="RANK=2 WORLD_SIZE=2"):
        gen.dist_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert gen.prompt_slug("A cat!").startswith("a-cat-") and gen.prompt_slug("a cat") != gen.prompt_slug("A cat!")
    assert gen.Job("a cat", 7).file == f"{gen.prompt_slug('a cat')}/00007.png"


# ---------------------------------------------------------------- tiny model

def test_on_torch_the_batch_size_is_a_setting_and_a_short_batch_is_padded(loaded, tmp_path, monkeypatch):
    """torch rounds differently at other batch sizes and thread counts (a pixel by 1/255): they are recorded, a rerun
    with others is refused, and the last short batch runs at full size (so a resume equals an uninterrupted run)."""
    import torch

    from invdiff_rt.runtime import sampling

    sizes, sample_images = [], sampling.sample_images
    monkeypatch.setattr(sampling, "sample_images", lambda rt, p, i, **kw: sizes.append(len(p)) or sample_images(
        rt, p, i, **kw))
    a = _run(loaded, tmp_path / "bs3", batch_size=3)
    assert a.written == 4 and sizes == [3, 3]  # 4 images: 3, then 1 padded to 3
    settings = gen.read_settings(tmp_path / "bs3")
    assert settings["batch_size"] == 3 and settings["threads"] == torch.get_num_threads()
    with pytest.raises(InvdiffError, match=r"other settings \(batch_size 3 -> 1\)"):
        _run(loaded, tmp_path / "bs3", batch_size=1)
    assert gen.batch_settings("onnxruntime", 3) == {} and gen.batch_settings("openvino", 3) == {}
    assert gen.batch_settings("torch-cuda", 3) == {"batch_size": 3}
    assert gen.batch_settings("tensorrt", 3) == gen.batch_settings("onnxruntime-cuda", 3) == {"batch_size": 3}
    more = _run(loaded, tmp_path / "bs3", batch_size=3, num=3)  # a larger --num resumes (the batch size is the user's)
    assert (more.written, more.skipped) == (2, 4)
    files_a = _files(tmp_path / "bs3")
    assert len([f for f in files_a if f.endswith(".png") and "grid" not in f]) == 6
    manifest = read_jsonl(tmp_path / "bs3" / gen.MANIFEST)
    assert [(r["prompt"], r["index"]) for r in manifest] == [(p, i) for p in sorted(PROMPTS) for i in range(3)]
    assert {r["backend"] for r in manifest} == {"torch"} and {r["seed"] for r in manifest} == {3}
    pixels = [Image.open(tmp_path / "bs3" / r["file"]) for r in manifest]
    assert len({im.tobytes() for im in pixels}) == 6  # every (prompt, index) is a different image


def test_resume_skips_finished_and_redoes_broken(loaded, tmp_path, monkeypatch):
    from invdiff_rt.runtime import sampling

    out = tmp_path / "out"
    first = _run(loaded, out, num=2)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("0000*.png")}
    real, calls = sampling.sample_images, []
    monkeypatch.setattr(sampling, "sample_images", lambda rt, p, i, **kw: calls.append(list(zip(p, i))) or
                        real(rt, p, i, **kw))
    again = _run(loaded, out, num=2)
    assert (first.written, again.written, again.skipped, calls) == (4, 0, 4, [])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("0000*.png")} == mtimes
    broken, deleted = out / gen.Job(PROMPTS[0], 1).file, out / gen.Job(PROMPTS[1], 0).file
    originals = {broken: broken.read_bytes(), deleted: deleted.read_bytes()}
    broken.write_bytes(b"not a png")
    deleted.unlink()
    more = _run(loaded, out, num=3)  # grow to 3 per prompt: 2 new + 2 redone
    assert (more.written, more.skipped) == (4, 2)
    assert sorted(k for c in calls for k in c) == sorted([(PROMPTS[0], 1), (PROMPTS[1], 0),
                                                          (PROMPTS[0], 2), (PROMPTS[1], 2)])
    assert {p: p.read_bytes() for p in originals} == originals
    assert len(read_jsonl(out / gen.MANIFEST)) == 6


def test_images_deleted_by_hand_leave_the_manifest_and_grids(loaded, tmp_path, monkeypatch, capsys):
    """A PNG deleted after its run, then a rerun with a smaller --num (or `--merge`): the merged manifest and the
    grids hold the images that exist (the grid raised FileNotFoundError on the missing one)."""
    from invdiff_rt import cli

    out = tmp_path / "out"
    _run(loaded, out, num=3)
    (out / gen.Job(PROMPTS[0], 2).file).unlink()
    again = _run(loaded, out, num=2)
    assert (again.written, again.skipped) == (0, 4)
    listed = sorted((r["prompt"], r["index"]) for r in read_jsonl(out / gen.MANIFEST))
    assert listed == sorted([(p, i) for p in PROMPTS for i in range(3) if (p, i) != (PROMPTS[0], 2)])
    assert Image.open(out / gen.prompt_slug(PROMPTS[0]) / gen.GRID).size == (64, 32)  # 2 images, not 3
    (out / gen.Job(PROMPTS[1], 0).file).unlink()
    monkeypatch.setattr(sys, "argv", ["invdiff", "generate", "--out", str(out), "--merge"])
    cli.main()
    assert "merged 4 images" in capsys.readouterr().out
    assert len(read_jsonl(out / gen.MANIFEST)) == 4


def test_the_model_size_given_explicitly_resumes_the_same_folder(model_dir, tmp_path):
    """--height/--width equal to the model's own size change no pixel, so they are not a new setting; another size
    is (it was refused as 'latent_shape None -> [4, 8, 8]' for the default size too)."""
    args = dict(model=model_dir, backend="torch", **FAST, num=1, batch_size=2)
    first = gen.generate(PROMPTS, tmp_path / "out", **args)
    again = gen.generate(PROMPTS, tmp_path / "out", height=32, width=32, **args)
    assert (first.written, again.written, again.skipped) == (2, 0, 2)
    with pytest.raises(InvdiffError, match=r"latent_shape None -> \[4, 12, 8\]"):
        gen.generate(PROMPTS, tmp_path / "out", height=48, width=32, **args)


def test_a_folder_with_someone_elses_manifest_or_run_file_is_refused(loaded, tmp_path):
    """The merge rewrites manifest.jsonl and run.json: ones generate did not write are refused, before any work; so
    is a folder of other files that holds no generate run."""
    for name, text in ((gen.MANIFEST, '{"id": 1, "note": "my data"}\n'), (gen.RUN_FILE, '{"my": "config"}')):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text(text)
        for overwrite in (False, True):
            with pytest.raises(InvdiffError, match=rf"^--out {out}: {name} was not written by `invdiff generate`"):
                _run(loaded, out, overwrite=overwrite)
        assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == text
    other = tmp_path / "adapter"  # another tool's folder, e.g. an adapter's: its PNGs would mix into it
    (other / "sub").mkdir(parents=True)
    (other / "adapter.json").write_text("{}")
    refusal = (r"^--out {}: holds {} but no generate run \(no run.json or manifest.jsonl\) to add images to; pass a "
               "new or empty folder$")
    with pytest.raises(InvdiffError, match=refusal.format(other, "adapter.json")):
        _run(loaded, other)
    assert sorted(p.name for p in other.iterdir()) == ["adapter.json", "sub"] and not any((other / "sub").iterdir())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("")  # an empty folder (dot files aside) is a new run's
    assert _run(loaded, tmp_path / "empty").written == 4
    ours = _run(loaded, tmp_path / "ours")
    (tmp_path / "ours" / gen.RUN_FILE).unlink()  # generate's own records, run.json deleted: still resumed
    assert (_run(loaded, tmp_path / "ours").skipped, ours.written) == (4, 4)
    for record in [gen.RUN_FILE, *(p.name for p in (tmp_path / "ours").glob("manifest*.jsonl"))]:
        (tmp_path / "ours" / record).unlink()  # only the images are left: nothing says which run they belong to
    first = sorted(p.name for p in (tmp_path / "ours").iterdir())[0]
    with pytest.raises(InvdiffError, match=refusal.format(tmp_path / "ours", first)):
        _run(loaded, tmp_path / "ours")


def test_an_interrupted_overwrite_lists_no_image_of_the_old_settings(loaded, tmp_path, monkeypatch):
    from invdiff_rt.runtime import sampling

    out = tmp_path / "out"
    _run(loaded, out, num=2)
    calls, sample_images = [], sampling.sample_images

    def killed_at_the_second_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample_images(*args, **kw)

    monkeypatch.setattr(sampling, "sample_images", killed_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(loaded, out, num=2, steps=3, overwrite=True)
    assert [r["settings"]["steps"] for r in read_jsonl(out / gen.MANIFEST)] == [3, 3]  # the old 4 lines are gone


def test_prompt_lines_end_only_at_line_endings_and_prompts_are_stripped(tmp_path):
    from invdiff_rt.commands.generate import _prompts

    path = tmp_path / "p.txt"
    path.write_text("a red digit\u2028 on black\r\nsmall\x0cbig digit 3\rnaïve\x85 digit 7\n", newline="")
    assert gen.read_prompts(path) == ["a red digit\u2028 on black", "small\x0cbig digit 3", "naïve\x85 digit 7"]
    assert _prompts([" a photo of the digit 3 "], None) == ["a photo of the digit 3"]  # as a --prompts line is


def test_adapter_weight_without_an_adapter_is_refused(tmp_path):
    from invdiff_rt import validate

    for values in ({"model": "m"}, {"export": _export_manifest(tmp_path / "plain", None)}):
        with pytest.raises(InvdiffError, match="^--adapter-weight: weighs an adapter, and no adapter is given"):
            validate._generate_combos({"prompt": ["p"], "adapter_weight": 1.5, **values})
    validate._generate_combos({"prompt": ["p"], "adapter_weight": 1.5, "backend": "onnxruntime",
                               "export": _export_manifest(tmp_path / "with", {"fingerprint": "a" * 64})})


def _export_manifest(path: Path, adapter) -> Path:
    from invdiff_rt.export.manifest import FORMAT, MANIFEST_NAME

    path.mkdir()
    (path / MANIFEST_NAME).write_text(json.dumps({"format": FORMAT, "components": {"denoiser": {"profile": {}}},
                                                       "latent_shape": [4, 8, 8], "scheduler_config": {}, "files": {},
                                                       "adapter": adapter}))
    return path


def test_changed_settings_refused_unless_overwrite(loaded, tmp_path):
    out = tmp_path / "out"
    _run(loaded, out, num=1)
    with pytest.raises(InvdiffError) as e:
        _run(loaded, out, num=1, steps=3)
    msg = str(e.value)
    assert "\n" not in msg and str(out / gen.RUN_FILE) in msg and "steps 2 -> 3" in msg and "--overwrite" in msg
    with pytest.raises(InvdiffError, match="seed 3 -> 4"):
        _run(loaded, out, num=1, seed=4)
    redone = _run(loaded, out, num=1, steps=3, overwrite=True)
    assert redone.written == 2
    assert {r["settings"]["steps"] for r in read_jsonl(out / gen.MANIFEST)} == {3}


@pytest.mark.parametrize("damage", [b"{bad", b"[1]", b'{"settings": null}'])
def test_a_damaged_run_file_is_refused_unless_overwrite(loaded, tmp_path, damage):
    out = tmp_path / "out"
    _run(loaded, out, num=1)
    (out / gen.RUN_FILE).write_bytes(damage)
    with pytest.raises(InvdiffError, match=r"run.json: run settings (is|are) not (valid JSON|a JSON object).*; use a "
                                           r"new --out or pass --overwrite$"):
        _run(loaded, out, num=1)
    again = _run(loaded, out, num=1, overwrite=True)  # replaced; the images of the same settings are kept
    assert (again.written, again.skipped) == (0, 2)
    assert json.loads((out / gen.RUN_FILE).read_text())["settings"] == gen.read_settings(out)


def test_manifest_lines_must_be_json_objects(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"file": "a.png"}\n{"file": "b.png"')  # a torn tail from a killed writer: ignored
    assert read_jsonl(path) == [{"file": "a.png"}]
    path.write_text('{"file": "a.png"}\n[1]\n')  # valid JSON, not an object: was a TypeError in its readers
    with pytest.raises(InvdiffError, match=r"manifest.jsonl:2: not a JSON object; delete the line or the file"):
        read_jsonl(path)


def test_grid_per_prompt_has_expected_size(loaded, tmp_path):
    result = _run(loaded, tmp_path / "out", num=3)
    width, height = Image.open(tmp_path / "out" / gen.Job(PROMPTS[0], 0).file).size
    assert sorted(result.grids) == sorted(tmp_path / "out" / gen.prompt_slug(p) / gen.GRID for p in PROMPTS)
    for path in result.grids:
        assert Image.open(path).size == (2 * width, 2 * height)  # 3 images -> 2x2 cells, one black
    assert not _run(loaded, tmp_path / "nogrid", num=1, grid=False).grids
    assert not list((tmp_path / "nogrid").rglob(gen.GRID))


def test_a_grid_shows_a_prompts_first_images(loaded, tmp_path, monkeypatch):
    """A grid tiled every image: 1,000 SD images per prompt made a 16k x 16k PNG, held in memory to encode."""
    monkeypatch.setattr(gen, "GRID_TILES", 4)
    out = tmp_path / "out"
    result = _run(loaded, out, num=6)
    width, height = Image.open(out / gen.Job(PROMPTS[0], 0).file).size
    grid = np.asarray(Image.open(out / gen.prompt_slug(PROMPTS[0]) / gen.GRID))
    assert len(result.grids) == 2 and grid.shape == (2 * height, 2 * width, 3)
    last = np.asarray(Image.open(out / gen.Job(PROMPTS[0], 3).file).convert("RGB"))
    assert (grid[height:, width:] == last).all()  # tile 4 is image 3: the first four, in order


def test_cli_bad_prompts_file_is_one_line_error(tmp_path, monkeypatch, capsys):
    from invdiff_rt import cli

    missing = tmp_path / "missing.txt"
    monkeypatch.setattr(sys, "argv", ["invdiff", "generate", "--model", "colored-digits", "--prompts", str(missing),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and str(missing) in err
    assert not (tmp_path / "out").exists()


def test_an_overwrite_that_fails_before_its_first_image_puts_the_finished_run_back(loaded, tmp_path, monkeypatch):
    """A failed --overwrite with other settings deleted the finished run's manifest and left run.json holding the
    failed settings: the original command was then refused ("other settings") and --overwrite remade every image."""
    out = tmp_path / "out"
    _run(loaded, out, num=2)
    before = _files(out)
    monkeypatch.setenv("INVDIFF_FORCE_NAN_STEP", "1")
    with pytest.raises(InvdiffError, match="non-finite"):
        _run(loaded, out, num=2, steps=3, overwrite=True)
    monkeypatch.delenv("INVDIFF_FORCE_NAN_STEP")
    assert _files(out) == before
    again = _run(loaded, out, num=2)
    assert (again.written, again.skipped) == (0, 4)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory"),
                                   KeyboardInterrupt()])
def test_a_fresh_out_is_removed_whatever_stops_the_run_before_its_first_image(loaded, tmp_path, monkeypatch, error):
    """Only an InvdiffError undid the fresh folder: out of memory at a huge --height (or Ctrl-C) left run.json, and
    the corrected rerun was refused as "other settings"."""
    from invdiff_rt.runtime import sampling

    def fail(*args, **kw):
        raise error

    monkeypatch.setattr(sampling, "sample_images", fail)
    with pytest.raises(type(error)):
        _run(loaded, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert _run(loaded, tmp_path / "new" / "out").written == 4


def test_an_overwrite_with_other_settings_removes_the_replaced_runs_images_and_grids(loaded, tmp_path):
    """--overwrite left the earlier run's grids (stale under --no-grid) and the images it did not make again (a
    smaller --num) beside the new ones, listed in no manifest: a folder of two settings."""
    out = tmp_path / "out"
    _run(loaded, out, num=3)
    assert len(list(out.rglob(gen.GRID))) == 2 and len(list(out.rglob("*.png"))) == 8
    kept_same = _run(loaded, out, num=1, overwrite=True)  # same settings: nothing is replaced
    assert len(list(out.rglob("*.png"))) == 8 and kept_same.written == 0
    redone = _run(loaded, out, num=1, seed=4, overwrite=True, grid=False)
    listed = sorted(r["file"] for r in read_jsonl(out / gen.MANIFEST))
    assert redone.written == 2 and sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == listed
    assert len(listed) == 2 and not list(out.rglob(gen.GRID))


def test_an_overwrite_under_two_ranks_removes_what_any_manifest_listed(loaded, tmp_path):
    """Each rank decided alone whether the settings changed: the rank that read run.json after the other rewrote it
    saw no change and, finishing last, removed nothing; images listed only in a killed run's rank parts survived."""
    out = tmp_path / "out"
    for rank in (0, 1):
        _run(loaded, out, num=3, rank=rank, world_size=2)
    (out / gen.MANIFEST).unlink()  # as if killed before the merge: only the rank parts list the images
    for rank in (0, 1):  # rank 1 reads run.json after rank 0 rewrote it: no change for it, and it finishes last
        _run(loaded, out, num=1, seed=4, rank=rank, world_size=2, overwrite=True, grid=False)
    listed = sorted(r["file"] for r in read_jsonl(out / gen.MANIFEST))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == listed and len(listed) == 2
    assert gen.REPLACES not in json.loads((out / gen.RUN_FILE).read_text())


def test_an_interrupted_overwrite_removes_the_replaced_files_when_resumed(loaded, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _run(loaded, out, num=3)
    with monkeypatch.context() as m:
        m.setattr(gen, "_finish", lambda *a, **k: None)  # killed after its images, before the merge
        _run(loaded, out, num=1, seed=4, overwrite=True)
    assert len(json.loads((out / gen.RUN_FILE).read_text())[gen.REPLACES]) == 8  # 6 images, 2 grids
    resumed = _run(loaded, out, num=1, seed=4)
    assert (resumed.written, resumed.skipped) == (0, 2)
    assert len(list(out.rglob("*.png"))) == 4  # the two new images and their grids
    assert gen.REPLACES not in json.loads((out / gen.RUN_FILE).read_text())


def test_merge_removes_what_an_overwrite_replaced_when_its_last_rank_died(loaded, tmp_path, monkeypatch, capsys):
    from invdiff_rt import cli

    out = tmp_path / "out"
    _run(loaded, out, num=3)
    with monkeypatch.context() as m:
        m.setattr(gen, "_finish", lambda *a, **k: None)  # the last rank died before merging
        for rank in (0, 1):
            _run(loaded, out, num=1, seed=4, rank=rank, world_size=2, overwrite=True)
    monkeypatch.setattr(sys, "argv", ["invdiff", "generate", "--merge", "--out", str(out)])
    cli.main()
    listed = sorted(r["file"] for r in read_jsonl(out / gen.MANIFEST))
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.name != gen.GRID)
    assert pngs == listed and len(listed) == 2 and len(list(out.rglob(gen.GRID))) == 2  # the new grids
    assert gen.REPLACES not in json.loads((out / gen.RUN_FILE).read_text())


def test_prompts_with_words_the_model_does_not_know_are_refused(tmp_path, monkeypatch, capsys):
    """The built-in models' word-level tokenizer read "a zebra" and "a giraffe" as one unknown token: generate wrote
    the same images under both names (exit 0), where eval, pretrain and training refuse such captions."""
    from invdiff_rt import cli

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["invdiff", "generate", "--model", "colored-digits", "--prompt", "a zebra",
                                      "--prompt", "a photo of the digit 3", "--num", "1", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert err == ("error: --prompt/--prompts: the model's tokenizer does not know the words of ['a zebra'] (read as "
                   "one unknown token, such prompts cannot be told apart); use the words of the captions the model "
                   "was trained on")


# ---------------------------------------------------------------- processes

@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(model_dir, tmp_path):
    out, num = tmp_path / "killed", 10
    # the reference from the same CLI, batch size and thread count (torch settings: a pixel of "a blue digit" #4
    # sits on a rounding edge that batches of one and of >= 2 round apart); the rerun's last short batch is padded
    proc = _cli(*_cli_args(model_dir, out, num, batch_size=2))
    manifest, deadline = out / gen.MANIFEST, time.time() + 120
    while not (manifest.exists() and manifest.read_text().count("\n") >= 1) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = len(read_jsonl(manifest))
    assert 1 <= done < 2 * num
    rerun = _cli(*_cli_args(model_dir, out, num, batch_size=2))
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"{2 * num - done} images written, {done} skipped" in stdout
    reference = _cli(*_cli_args(model_dir, tmp_path / "reference", num, batch_size=2))
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr
    assert _files(out) == _files(tmp_path / "reference")


@pytest.mark.slow
def test_two_ranks_are_disjoint_and_union_equals_single_process(model_dir, tmp_path):
    out, num = tmp_path / "ranks", 3
    procs = [_cli(*_cli_args(model_dir, out, num), env={"RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    parts = [read_jsonl(out / f"manifest.rank{r}-of-2.jsonl") for r in range(2)]
    keys = [{(rec["prompt"], rec["index"]) for rec in part} for part in parts]
    assert len(keys[0]) == len(keys[1]) == 3 and not keys[0] & keys[1]
    single = _cli(*_cli_args(model_dir, tmp_path / "single", num))  # the ranks' thread count (a torch setting)
    _, stderr = single.communicate(timeout=300)
    assert single.returncode == 0, stderr
    assert (out / gen.MANIFEST).read_bytes() == (tmp_path / "single" / gen.MANIFEST).read_bytes()
    ranked = {k: v for k, v in _files(out).items() if not k.startswith("manifest.rank")}
    assert ranked == _files(tmp_path / "single")
