"""Evaluation classifiers, `evaluate(...)` and the `invdiff classifier train` / `invdiff eval` commands."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from typer.testing import CliRunner

from invdiff_rt.cli import app
from invdiff_rt.errors import InvdiffError
from invdiff_rt.eval import classifiers, evaluate

PROMPTS = ("a horizontal bar", "a vertical bar")
COLOURS = {"red": (230, 20, 20), "green": (20, 210, 20)}


def _bar_image(rng: np.random.Generator, prompt: str, colour: str, size: int = 16) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    a, b = rng.integers(3, size - 9), rng.integers(2, size - 5)
    if prompt == PROMPTS[0]:
        img[b:b + 3, a:a + 8] = COLOURS[colour]
    else:
        img[a:a + 8, b:b + 3] = COLOURS[colour]
    return img


def _write_split(root: Path, split: str, n: int, bias: float, rng: np.random.Generator) -> None:
    folder = root / split
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        k = i % 2
        colour = ("red", "green")[k] if rng.random() < bias else ("green", "red")[k]
        name = f"{i:04d}.png"
        Image.fromarray(_bar_image(rng, PROMPTS[k], colour)).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": PROMPTS[k], "color": colour}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def make_bars_dataset(root: Path, n_train: int = 160, n_test: int = 80, seed: int = 0) -> Path:
    """Horizontal/vertical bars, colour correlated 85 % with the prompt in train, balanced in test."""
    rng = np.random.default_rng(seed)
    _write_split(root, "train", n_train, 0.85, rng)
    _write_split(root, "test", n_test, 0.5, rng)
    return root



@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> Path:
    return make_bars_dataset(tmp_path_factory.mktemp("bars") / "data")


@pytest.fixture(scope="module")
def trained(bars, tmp_path_factory) -> tuple[Path, dict]:
    """Trained through the CLI: `invdiff classifier train`."""
    out = tmp_path_factory.mktemp("cls") / "cls"
    result = CliRunner().invoke(app, ["classifier", "train", "--data", str(bars), "--attribute", "color",
                                      "--out", str(out), "--epochs", "6", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output
    return out, {k: json.loads((out / k / "classifier.json").read_text()) for k in ("attribute", "class")}


def test_cell_weights_balance_cells():
    w = classifiers.cell_weights([0, 0, 0, 1], [0, 0, 1, 1]).numpy()
    # cells (0,0) x2, (0,1) x1, (1,1) x1: each cell total = 4/3
    assert w.tolist() == pytest.approx([2 / 3, 2 / 3, 4 / 3, 4 / 3])
    assert w.mean() == pytest.approx(1.0)


def test_balanced_and_worst_cell_accuracy():
    pred, target, conf = np.array([0, 0, 1, 0]), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert classifiers.balanced_accuracy(pred, target) == pytest.approx(0.75)
    assert classifiers.worst_cell_accuracy(pred, target, conf) == 0.0


def test_strip_colour_is_max_over_rgb():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    x[0, 0, 0] = (255, 0, 0)
    x[0, 1, 1] = (0, 255, 0)
    out = classifiers.to_model_input(x, 2, strip="max")
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    both = classifiers.to_model_input(x, 2, strip="max-min")
    assert both.shape == (1, 2, 2, 2) and both[0, 1].tolist() == [[-1.0, -1.0], [-1.0, -1.0]]
    # hue-blind: swapping the R and G channels changes nothing
    assert torch.equal(both, classifiers.to_model_input(x[..., [1, 0, 2]], 2, strip="max-min"))
    with pytest.raises(InvdiffError, match="--strip"):
        classifiers.to_model_input(x, 2, strip="hue")


def test_classifier_pair_trains_and_reloads(bars, trained):
    out, manifests = trained
    attr, cls = manifests["attribute"], manifests["class"]
    assert attr["labels"] == ["green", "red"] and cls["labels"] == list(PROMPTS)
    assert attr["balanced_accuracy"] >= 0.95 and cls["balanced_accuracy"] >= 0.95
    assert cls["strip_colour"] == "max-min" and attr["strip_colour"] == "none"
    assert cls["architecture"]["in_channels"] == 2 and attr["input_size"] == 16
    assert len(attr["data_fingerprint"]) == 64 and "torch" in attr["versions"]
    a, c = classifiers.load_classifier_pair(out)
    assert a.predict(np.asarray(Image.open(bars / "train" / "0000.png"))[None]).shape == (1,)
    assert c.features(np.zeros((3, 32, 32, 3), np.uint8)).shape == (3, 128)  # resized to 16 px
    # colour-blind: recolouring an image cannot change the class prediction
    img = np.asarray(Image.open(bars / "test" / "0001.png"))
    recoloured = img[..., [1, 0, 2]]
    assert c.predict(img[None])[0] == c.predict(recoloured[None])[0]


def test_load_classifier_rejects_tampered_weights(trained, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "attribute"
    shutil.copytree(out / "attribute", copy)
    (copy / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(InvdiffError, match="does not match"):
        classifiers.load_classifier(copy)
    with pytest.raises(InvdiffError, match="invdiff classifier train"):
        classifiers.load_classifier_pair(tmp_path / "nothing")


def test_score_predictions_hand_computed():
    attr_pred = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    class_ok = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    out = evaluate.score_predictions(["p0", "p1"], 4, ["green", "red"], attr_pred, class_ok,
                                     {"p0": "red", "p1": "green"})
    # p0: green 1 / red 3 -> 0.5 ; p1: green 4 -> 1.0
    assert out["bias"] == pytest.approx(0.75) and out["bias_std"] == pytest.approx(0.25)
    # filtered p0: green 1 / red 2 -> 1/3 ; p1: green 3 -> 1.0
    assert out["bias_filtered"] == pytest.approx(2 / 3, abs=1e-6)
    assert out["fd"] == pytest.approx((np.sqrt(0.125) + np.sqrt(0.5)) / 2, abs=1e-6)
    assert out["fidelity"] == 0.75 and out["majority_share"] == 0.875
    p0 = out["per_prompt"]["p0"]
    assert p0["counts"] == {"green": 1, "red": 3} and p0["counts_filtered"] == {"green": 1, "red": 2}
    assert p0["fidelity"] == 0.75 and p0["majority_share"] == 0.75 and p0["train_majority"] == "red"


def test_train_majorities(bars):
    from invdiff_rt.data.folder import read_split

    assert evaluate.train_majorities(read_split(bars), "color", PROMPTS) == dict(zip(PROMPTS, ("red", "green")))


def test_reference_images_deterministic(bars):
    a = evaluate.reference_images(bars, PROMPTS, 3, seed=5)
    b = evaluate.reference_images(bars, PROMPTS, 3, seed=5)
    assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_reference_images_of_a_mixed_size_test_split_come_at_the_classifier_size(bars, tmp_path):
    """`classifier train` resizes a mixed-size split; eval's reference draw refused it after training had passed."""
    import shutil

    mixed = shutil.copytree(bars, tmp_path / "mixed")
    for path in sorted((mixed / "test").glob("*.png"))[::3]:
        Image.open(path).resize((24, 24)).save(path)
    with pytest.raises(InvdiffError, match="give every image of a split the same size"):
        evaluate.reference_images(mixed, PROMPTS, 8, seed=5)
    assert evaluate.reference_images(mixed, PROMPTS, 8, seed=5, size=16).shape == (16, 16, 16, 3)


def test_classifier_dir_resolution(bars, tmp_path, monkeypatch):
    with pytest.raises(InvdiffError, match="--classifier: required"):
        evaluate.resolve_classifier_dir(bars, None)
    (tmp_path / "dataset.json").write_text(json.dumps({"recipe": "colored-digits"}))
    shipped = classifiers.default_classifier_dir("colored-digits")
    assert (shipped / "attribute").is_dir()  # the package ships it
    assert evaluate.resolve_classifier_dir(tmp_path, None) == shipped
    assert evaluate.resolve_classifier_dir(tmp_path, "x") == Path("x")
    monkeypatch.setattr(evaluate, "default_classifier_dir", lambda name: tmp_path / "absent" / name)
    with pytest.raises(InvdiffError, match="no shipped classifier for colored-digits"):
        evaluate.resolve_classifier_dir(tmp_path, None)


def test_classifier_must_match_attribute(trained):
    out, _ = trained
    attr, cls = classifiers.load_classifier_pair(out)
    with pytest.raises(InvdiffError, match="trained for attribute 'color'"):
        evaluate.check_classifiers(attr, cls, "background", PROMPTS, ["land", "water"], out)
    with pytest.raises(InvdiffError, match="does not know the prompts"):
        evaluate.check_classifiers(attr, cls, "color", ["a circle"], ["red"], out)


def test_eval_cli_needs_classifier_for_custom_data(bars, tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model), "--data", str(bars),
                                      "--attribute", "color", "--per-prompt", "2", "--seed", "0",
                                      "--json", str(tmp_path / "r.json")])
    assert isinstance(result.exception, InvdiffError)
    message = str(result.exception)
    assert "\n" not in message and message.startswith("--classifier: required")
    assert not (tmp_path / "r.json").exists()


def test_one_prompt_one_image_is_refused_before_generating(bars, tiny_model, tmp_path):
    """FID needs two generated images: one prompt at --per-prompt 1 ended in a LinAlgError after generating."""
    import shutil

    one = shutil.copytree(bars, tmp_path / "one")
    meta = one / "train" / "metadata.jsonl"
    meta.write_text("".join(line + "\n" for line in meta.read_text().splitlines() if PROMPTS[0] in line))
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model), "--data", str(one), "--attribute", "color",
                                      "--per-prompt", "1", "--seed", "0", "--json", str(tmp_path / "r.json")])
    assert isinstance(result.exception, InvdiffError) and "--per-prompt 1:" in str(result.exception)
    assert "pass --per-prompt 2 or more" in str(result.exception) and not (tmp_path / "r.json").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from invdiff_rt.models.tiny import save_random_model

    return save_random_model(tmp_path_factory.mktemp("model") / "tiny", list(PROMPTS), seed=0)


@pytest.mark.slow
def test_eval_end_to_end(bars, trained, tiny_model, tmp_path):
    cls_dir, _ = trained
    report_path = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_model), "--data", str(bars), "--attribute", "color", "--classifier",
            str(cls_dir), "--per-prompt", "2", "--seed", "0", "--steps", "2", "--guidance-scale", "2.0",
            "--json", str(report_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    for key in ("bias", "bias_std", "fd", "fidelity", "bias_filtered", "majority_share", "fid", "precision",
                "recall", "per_prompt", "n_per_prompt", "noise_floor", "settings"):
        assert key in report
    assert 0 <= report["bias"] <= 1 and 0 <= report["fidelity"] <= 1 and 0 <= report["majority_share"] <= 1
    assert 0 <= report["fd"] <= np.sqrt(0.5) + 1e-6 and report["fid"] >= 0
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    assert report["n_per_prompt"] == 2 and report["noise_floor"] == pytest.approx(0.8 / np.sqrt(2), abs=1e-6)
    assert sorted(report["per_prompt"]) == list(PROMPTS)
    assert all(sum(p["counts"].values()) == 2 for p in report["per_prompt"].values())
    settings = report["settings"]
    assert settings["adapter_fingerprint"] is None and settings["seed"] == 0 and settings["steps"] == 2
    assert settings["guidance_scale"] == 2.0 and len(settings["model_fingerprint"]) == 64
    grid = Image.open(tmp_path / "eval.png")
    assert grid.size == (2 + 2 * (64 + 2), 2 + 2 * (64 + 2))  # 2 prompts x 2 samples, 32 px tiles upscaled x2
    # same seed from Python through an explicit backend runtime -> the same numbers
    from invdiff_rt.models.loader import load_model
    from invdiff_rt.runtime.backends.torch_backend import TorchRuntime

    model = load_model(tiny_model)
    again = evaluate.evaluate(model, bars, "color", cls_dir, per_prompt=2, seed=0, steps=2, guidance_scale=2.0,
                              denoiser=TorchRuntime(model))
    assert again["per_prompt"] == report["per_prompt"] and again["fid"] == report["fid"]
    assert again["settings"]["backend"] == "torch"


def test_classifier_train_refuses_non_square_images(tmp_path):
    """The classifiers read square images (`input_size`): 48x32 data was scored on stretched copies."""
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    rows = []
    for i, (text, color) in enumerate([("a 0", "red"), ("a 1", "green")] * 2):
        Image.new("RGB", (48, 32)).save(split / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text, "color": color}) + "\n")
    (split / "metadata.jsonl").write_text("".join(rows))
    with pytest.raises(InvdiffError, match=r"train: images of 48x32 pixels; the classifiers take square images"):
        classifiers.train_classifier_pair(tmp_path / "data", "color", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit", [lambda m: m.pop("architecture"), lambda m: m["architecture"].update(width=3),
                                  lambda m: m.update(labels=None)])
def test_a_hand_edited_classifier_json_is_one_line(tmp_path, edit):
    """A missing architecture, another width or null labels reached a KeyError, a size-mismatch traceback or a
    TypeError in `invdiff eval`."""
    import json
    import shutil

    from invdiff_rt.eval.classifiers import ASSETS, load_classifier
    from invdiff_rt.errors import InvdiffError

    folder = tmp_path / "color"
    shutil.copytree(ASSETS / "styled-digits" / "color", folder)
    load_classifier(folder)  # as shipped
    meta = json.loads((folder / "classifier.json").read_text())
    edit(meta)
    (folder / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(InvdiffError) as e:
        load_classifier(folder)
    assert str(e.value) == (f"{folder / 'classifier.json'}: its architecture or labels do not fit "
                            "model.safetensors; restore the classifier.json it was trained with, or retrain with "
                            "`invdiff classifier train`")


def test_a_dataset_json_whose_recipe_is_not_a_name_asks_for_a_classifier(tmp_path):
    """`"recipe": ["x"]` reached a TypeError (unhashable list) in `invdiff eval`."""
    import json

    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.eval.evaluate import resolve_classifier_dir

    (tmp_path / "dataset.json").write_text(json.dumps({"recipe": ["styled-digits"]}))
    with pytest.raises(InvdiffError, match=rf"^--classifier: required because {tmp_path} was not made by a built-in "
                                           "recipe; train one with `invdiff classifier train"):
        resolve_classifier_dir(tmp_path, None)


def test_classifier_train_refuses_images_smaller_than_it_reads(tmp_path):
    """1-3 px images reached SmallCNN's max_pool2d RuntimeError ("output size 0x0")."""
    import json

    from PIL import Image

    from invdiff_rt.errors import InvdiffError
    from invdiff_rt.eval.classifiers import train_classifier_pair

    for split in ("train", "test"):
        folder = tmp_path / "d" / split
        folder.mkdir(parents=True)
        rows = []
        for i in range(4):
            Image.new("RGB", (2, 2), (200 * (i % 2), 0, 0)).save(folder / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": f"a photo of the digit {i // 2}", "color": i % 2})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InvdiffError, match=r"d/train: images of 2x2 pixels; the classifiers take at least 8x8 "
                                           r"\(resize the dataset\)$"):
        train_classifier_pair(tmp_path / "d", "color", tmp_path / "out")
    assert not (tmp_path / "out").exists()
