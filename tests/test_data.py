"""Data stage: dataset folder format, the two biased recipes, errors and the `invdiff data` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from invdiff_rt.artifacts import fingerprint_dir
from invdiff_rt.data import colored_digits, recipes, shapes_habitats
from invdiff_rt.data.folder import (Record, attribute_values, data_fingerprint, load_images, prompts_of, read_split,
                                    split_exists)
from invdiff_rt.data.recipes import RECIPES
from invdiff_rt.errors import InvdiffError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_train": 40, "n_test": 8}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return RECIPES["colored-digits"](tmp_path_factory.mktemp("d") / "cd", bias=0.95, seed=0, size=32)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for split in ("train", "test") for p in (root / split).iterdir()}


# ---------------------------------------------------------------- colored-digits


def test_colored_digits_is_deterministic_per_seed(digits):
    """Regenerating seed 0 reproduces the written PNG bytes and metadata exactly; seed 1 differs."""
    written = [(r.file.read_bytes(), r.attrs) for r in read_split(digits, "train")]
    again = colored_digits.generate(bias=0.95, seed=0, size=32)["train"]
    assert [(recipes.png_bytes(s.image), {k: v for k, v in s.row.items() if k != "text"}) for s in again] == written
    other = colored_digits.generate(bias=0.95, seed=1, size=32)["train"]
    assert [s.row for s in other] != [s.row for s in again]
    assert sum(np.array_equal(a.image, b.image) for a, b in zip(again, other)) < 10


def test_colored_digits_train_bias_and_manifest(digits):
    train = read_split(digits, "train")
    assert len(train) == 4000
    per_digit = Counter(r.attrs["digit"] for r in train)
    assert set(per_digit.values()) == {400}
    majority = [r.attrs["color"] == ("red" if r.attrs["digit"] % 2 == 0 else "green") for r in train]
    assert [not m for m in majority] == [r.attrs["minority"] for r in train]
    share = float(np.mean(majority))
    assert abs(share - 0.95) <= 0.02
    manifest = json.loads((digits / "dataset.json").read_text())
    assert manifest["train_bias"] == pytest.approx(share)
    assert manifest["recipe"] == "colored-digits" and manifest["attribute"] == "color"
    assert manifest["splits"]["train"]["count"] == 4000 and manifest["splits"]["test"]["count"] == 1000
    counts = manifest["splits"]["train"]["counts"]["a photo of the digit 3"]
    assert counts == dict(Counter(r.attrs["color"] for r in train if r.attrs["digit"] == 3))
    assert manifest["fingerprints"]["train"] == data_fingerprint(digits, "train")


def test_colored_digits_test_split_is_exactly_balanced(digits):
    test = read_split(digits, "test")
    table = Counter((r.text, r.attrs["color"]) for r in test)
    assert table == {(f"a photo of the digit {d}", c): 50 for d in range(10) for c in ("red", "green")}
    assert prompts_of(test) == [f"a photo of the digit {d}" for d in range(10)]
    assert attribute_values(test, "color") == ["green", "red"]


def test_colored_digits_pixels_are_pure_coloured_mnist_and_splits_disjoint(digits):
    strokes = {}
    for split in ("train", "test"):
        records = read_split(digits, split)
        rgb = np.stack([np.asarray(Image.open(r.file)) for r in records])  # [N,32,32,3] uint8
        is_red = np.array([r.attrs["color"] == "red" for r in records])
        assert not rgb[is_red][..., 1:].any() and not rgb[~is_red][..., [0, 2]].any()  # pure red / pure green
        strokes[split] = {img.max(axis=-1).tobytes() for img in rgb}
        assert len(strokes[split]) == len(records)
    assert not strokes["train"] & strokes["test"]
    x, _ = colored_digits.load_mnist()
    assert strokes["train"] | strokes["test"] == {np.pad(d, 2).tobytes() for d in x}  # every digit used once


def test_colored_digits_resize():
    stroke = colored_digits.stroke_image(np.full((28, 28), 255, np.uint8), 16)
    assert stroke.shape == (16, 16) and stroke.dtype == np.float32
    assert stroke[8, 8] == 1.0 and stroke[0, 0] < 1.0
    img = colored_digits.colorize(np.array([[0.0, 0.5, 1.0]], np.float32), "green")
    assert img.tolist() == [[[0, 0, 0], [0, 128, 0], [0, 255, 0]]]


# ---------------------------------------------------------------- shapes-habitats


def test_shapes_habitats_deterministic_balanced_and_separable(tmp_path):
    a = RECIPES["shapes-habitats"](tmp_path / "a", bias=0.9, seed=3, size=32, n_train=200, n_test=40)
    b = RECIPES["shapes-habitats"](tmp_path / "b", bias=0.9, seed=3, size=32, n_train=200, n_test=40)
    c = RECIPES["shapes-habitats"](tmp_path / "c", bias=0.9, seed=4, size=32, n_train=200, n_test=40)
    assert _tree_bytes(a) == _tree_bytes(b) and _tree_bytes(a) != _tree_bytes(c)
    test = read_split(a, "test")
    assert Counter((r.attrs["shape"], r.attrs["background"]) for r in test) == {
        (s, bg): 10 for s in ("circle", "triangle") for bg in ("water", "land")}
    train = read_split(a, "train")
    assert Counter(r.attrs["shape"] for r in train) == {"circle": 100, "triangle": 100}
    for r in train:
        assert r.text == f"a photo of a {r.attrs['shape']}"
        assert r.attrs["minority"] == (r.attrs["background"] != shapes_habitats.HABITAT[r.attrs["shape"]])
    assert abs(np.mean([not r.attrs["minority"] for r in train]) - 0.9) <= 0.06
    # backgrounds are trivially separable: mean blue > mean green exactly on water
    x = load_images(train + test)
    water = np.array([r.attrs["background"] == "water" for r in train + test])
    assert ((x[:, 2].mean((1, 2)) > x[:, 1].mean((1, 2))).numpy() == water).all()


def test_shapes_habitats_shapes_are_bold():
    rng = np.random.default_rng(0)
    for shape in ("circle", "triangle"):
        areas = [shapes_habitats.shape_mask(rng, shape, 32).sum() for _ in range(50)]
        assert 90 < min(areas) and max(areas) < 400  # about 9-40 % of a 32x32 image


# ---------------------------------------------------------------- folder format and errors


def _png(path: Path, rgb: tuple[int, int, int], size: int = 4) -> None:
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(path)


def _folder(tmp_path: Path, lines: list[str]) -> Path:
    split = tmp_path / "ds" / "train"
    split.mkdir(parents=True)
    _png(split / "a.png", (255, 0, 0))
    _png(split / "b.png", (0, 0, 255))
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "ds"


GOOD = ['{"file_name": "a.png", "text": "red", "color": "red"}', '{"file_name": "b.png", "text": "blue", "color": "blue"}']


def test_read_split_and_load_images(tmp_path):
    root = _folder(tmp_path, GOOD)
    records = read_split(root)
    assert records[0] == Record(root / "train" / "a.png", "red", {"color": "red"}, 1)
    assert records[1].line == 2 and split_exists(root, "train") and not split_exists(root, "test")
    x = load_images(records)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0] and x[1, :, 3, 3].tolist() == [-1.0, -1.0, 1.0]
    assert load_images(records, size=2).shape == (2, 3, 2, 2)
    assert prompts_of(records) == ["blue", "red"] and attribute_values(records, "color") == ["blue", "red"]


def test_data_fingerprint_tracks_image_bytes(tmp_path):
    root = _folder(tmp_path, GOOD)
    before = data_fingerprint(root, "train")
    assert data_fingerprint(root, "train") == before
    _png(root / "train" / "b.png", (0, 0, 254))
    assert data_fingerprint(root, "train") != before


@pytest.mark.parametrize("line2, message", [
    ('{"file_name": "b.png", "text": "blue"', "metadata.jsonl:2: not valid JSON"),
    ('{"file_name": "b.png", "color": "blue"}', 'metadata.jsonl:2: missing "text"; every line needs file_name and text'),
    ('{"text": "blue"}', 'metadata.jsonl:2: missing "file_name"'),
    ('{"file_name": "gone.png", "text": "blue"}', "metadata.jsonl:2: image"),
    ('["b.png", "blue"]', "metadata.jsonl:2: expected a JSON object"),
    ('{"file_name": "../a.png", "text": "blue"}', "metadata.jsonl:2: \"file_name\" must be a path inside"),
])
def test_metadata_errors_name_file_and_line(tmp_path, line2, message):
    root = _folder(tmp_path, [GOOD[0], line2])
    with pytest.raises(InvdiffError) as e:
        read_split(root)
    text = str(e.value)
    assert message in text and str(root / "train" / "metadata.jsonl") in text and "\n" not in text


def test_missing_split_unreadable_image_and_missing_column(tmp_path):
    root = _folder(tmp_path, GOOD)
    with pytest.raises(InvdiffError, match=r"test/metadata.jsonl: not found"):
        read_split(root, "test")
    (root / "train" / "b.png").write_bytes(b"not a png")
    records = read_split(root)
    with pytest.raises(InvdiffError, match=r"b\.png: unreadable image .*metadata line 2"):
        load_images(records)
    with pytest.raises(InvdiffError, match=r'metadata.jsonl:1: missing column "shape"'):
        attribute_values(records, "shape")


def test_an_attribute_that_is_not_one_value_is_one_line(tmp_path):
    root = _folder(tmp_path, [GOOD[0], '{"file_name": "b.png", "text": "blue", "color": ["blue", "red"]}'])
    with pytest.raises(InvdiffError, match=r'metadata.jsonl:2: column "color" is list, not one value'):
        attribute_values(read_split(root), "color")  # was "unhashable type: 'list'" in `invdiff data info`


def test_failed_make_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / "sh"
    RECIPES["shapes-habitats"](out, seed=0, **SMALL)
    before = fingerprint_dir(out)
    calls = iter(range(10))

    def flaky(image):
        if next(calls) == 5:
            raise OSError("disk full")
        return png_bytes(image)

    png_bytes = recipes.png_bytes
    monkeypatch.setattr(recipes, "png_bytes", flaky)
    with pytest.raises(OSError):
        RECIPES["shapes-habitats"](out, seed=1, **SMALL)
    assert fingerprint_dir(out) == before  # old dataset intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sh"]  # no temporary folder left


@pytest.mark.parametrize("kwargs, flag", [({"bias": 1.5}, "--bias"), ({"size": 4}, "--size"),
                                          ({"seed": -1}, "--seed"), ({"n_train": 2}, "--n-train")])
def test_bad_parameters(tmp_path, kwargs, flag):
    with pytest.raises(InvdiffError, match=flag):
        RECIPES["shapes-habitats"](tmp_path / "x", **{**SMALL, **kwargs})
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- CLI


def test_cli_make_and_info(tmp_path):
    from invdiff_rt.cli import app

    runner = CliRunner()
    out = tmp_path / "sh"
    result = runner.invoke(app, ["data", "make", "shapes-habitats", "--out", str(out), "--seed", "2",
                                 "--n-train", "24", "--n-test", "8", "--size", "16"])
    assert result.exit_code == 0, result.output
    assert len(read_split(out, "train")) == 24 and load_images(read_split(out, "test")).shape == (8, 3, 16, 16)
    result = runner.invoke(app, ["data", "info", str(out)])
    assert result.exit_code == 0 and "a photo of a triangle" in result.output and "water" in result.output
    result = runner.invoke(app, ["data", "make", "nope", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, InvdiffError)
    assert "colored-digits, shapes-habitats" in str(result.exception)
    result = runner.invoke(app, ["data", "make", "colored-digits", "--out", str(tmp_path / "x"), "--n-train", "5"])
    assert isinstance(result.exception, InvdiffError) and "--n-train" in str(result.exception)
    assert not (tmp_path / "x").exists()
    (out / "dataset.json").write_text("{}\n")  # a manifest without the attribute: was a KeyError
    result = runner.invoke(app, ["data", "info", str(out)])
    assert isinstance(result.exception, InvdiffError)
    assert str(result.exception) == (f"--attribute: {out / 'dataset.json'} records no attribute; pass one of: "
                                     "background, fill, minority, shape")


def test_console_entry_exit_code_and_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "invdiff_rt.cli", "data", "make", "nope", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown; choose one of colored-digits, shapes-habitats" in lines[0]
    assert not (tmp_path / "x").exists()
