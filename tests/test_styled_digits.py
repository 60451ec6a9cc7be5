"""styled-digits: two spurious attributes (colour, stroke), each at its own requested bias, independent given the
digit; deterministic per seed; the CLI flag and the per-attribute classifier layout used by `invdiff eval`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from invdiff_rt.artifacts import fingerprint_dir
from invdiff_rt.data import colored_digits, styled_digits
from invdiff_rt.data.folder import read_split
from invdiff_rt.data.recipes import RECIPES
from invdiff_rt.errors import InvdiffError

N_TRAIN = 4000


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> Path:
    return RECIPES["styled-digits"](tmp_path_factory.mktemp("s") / "sd", bias=0.7, stroke_bias=0.85, seed=3)


def _tolerance(p: float, n: int) -> float:
    """Five binomial standard deviations of a share p measured on n draws."""
    return 5 * (p * (1 - p) / n) ** 0.5


def test_same_seed_same_bytes_other_seed_differs(styled, tmp_path):
    again = RECIPES["styled-digits"](tmp_path / "again", bias=0.7, stroke_bias=0.85, seed=3)
    assert fingerprint_dir(again) == fingerprint_dir(styled)
    manifest = json.loads((again / "dataset.json").read_text())
    assert manifest["fingerprints"] == json.loads((styled / "dataset.json").read_text())["fingerprints"]
    other = styled_digits.generate(color_bias=0.7, stroke_bias=0.85, seed=4, size=32)
    rows = [{k: v for k, v in json.loads(line).items() if k != "file_name"}
            for line in (styled / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [s.row for s in other["train"]] != rows


@pytest.mark.parametrize("attribute,requested", [("color", 0.7), ("stroke", 0.85)])
def test_realised_bias_per_attribute_is_as_requested(styled, attribute, requested):
    train = read_split(styled, "train")
    assert len(train) == N_TRAIN
    major = styled_digits.majority_color if attribute == "color" else styled_digits.majority_stroke
    majority = np.array([r.attrs[attribute] == major(r.attrs["digit"]) for r in train])
    assert np.array_equal(~majority, np.array([r.attrs[f"minority_{attribute}"] for r in train]))
    assert abs(majority.mean() - requested) <= _tolerance(requested, N_TRAIN)
    for digit in range(10):  # per prompt too, on its 400 images
        share = majority[[r.attrs["digit"] == digit for r in train]].mean()
        assert abs(share - requested) <= _tolerance(requested, 400)
    manifest = json.loads((styled / "dataset.json").read_text())
    assert manifest["train_bias_per_attribute"][attribute] == pytest.approx(majority.mean())
    if attribute == manifest["attribute"]:  # the recorded attribute's own bias (it counted either minority)
        assert manifest["train_bias"] == pytest.approx(majority.mean())
        assert manifest["splits"]["test"]["majority_share"] == pytest.approx(0.5)
    assert manifest["attributes"] == ["color", "stroke"] and manifest["attribute"] == "color"
    assert manifest["recipe"] == "styled-digits" and manifest["stroke_bias"] == 0.85


CHI2_10_DF_Q9999 = 35.56  # the 0.9999 quantile of chi-square with 10 degrees of freedom


def _chi2_2x2(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's chi-square statistic of the 2x2 table of two boolean arrays (1 degree of freedom)."""
    n11, n10, n01, n00 = (a & b).sum(), (a & ~b).sum(), (~a & b).sum(), (~a & ~b).sum()
    return len(a) * float(n11 * n00 - n10 * n01) ** 2 / float((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))


def test_chi2_2x2_hand_values():
    a = np.array([True] * 10 + [False] * 10)
    assert _chi2_2x2(a, a) == pytest.approx(20.0)  # perfect association: chi2 = n
    assert _chi2_2x2(a, np.array([True, False] * 10)) == pytest.approx(0.0)  # exactly independent


def test_attributes_are_independent_given_the_digit(styled):
    """Per digit, the colour and stroke minority flags are independent: the chi-square statistics of the ten
    per-digit 2x2 tables sum below chi2(10)'s 0.9999 quantile (at these biases a digit where the two never
    co-occur adds about 30 on its own, one where the stroke minority is always the colour minority about 165,
    and ten independent digits about 10 in all); pooled over digits (identical marginals) the joint rate is the
    product of the two."""
    train = read_split(styled, "train")
    c = np.array([r.attrs["minority_color"] for r in train])
    s = np.array([r.attrs["minority_stroke"] for r in train])
    digit = np.array([r.attrs["digit"] for r in train])
    assert sum(_chi2_2x2(c[digit == d], s[digit == d]) for d in range(10)) < CHI2_10_DF_Q9999
    expected = 0.3 * 0.15
    assert abs((c & s).mean() - expected) <= _tolerance(expected, N_TRAIN)
    assert np.array_equal(np.array([r.attrs["minority"] for r in train]), c | s)


def test_test_split_has_exactly_25_per_cell(styled):
    test = read_split(styled, "test")
    table = Counter((r.attrs["digit"], r.attrs["color"], r.attrs["stroke"]) for r in test)
    assert table == {(d, c, k): 25 for d in range(10) for c in ("red", "green") for k in ("thick", "thin")}


def test_pixels_thin_is_colored_digits_thick_is_dilated(styled):
    """A thin image is exactly the colored-digits pixel of its MNIST digit; a thick one is its 3x3 dilation."""
    x, _ = colored_digits.load_mnist()
    thin = {colored_digits.colorize(colored_digits.stroke_image(d, 32), "red").max(-1).tobytes() for d in x}
    thick = {colored_digits.colorize(colored_digits.stroke_image(styled_digits.thicken(d), 32), "red")
             .max(-1).tobytes() for d in x}
    for r in read_split(styled, "test")[:200]:
        stroke = np.asarray(Image.open(r.file)).max(-1).tobytes()
        assert stroke in (thick if r.attrs["stroke"] == "thick" else thin)
    digit = np.zeros((5, 5), np.uint8)
    digit[2, 2] = 200
    assert styled_digits.thicken(digit).tolist() == [[0] * 5] + [[0, 200, 200, 200, 0]] * 3 + [[0] * 5]


def test_cli_stroke_bias_flag(tmp_path):
    from invdiff_rt.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["data", "make", "styled-digits", "--out", str(tmp_path / "x"), "--stroke-bias", "1.5"])
    assert isinstance(res.exception, InvdiffError) and "--stroke-bias 1.5" in str(res.exception)
    res = runner.invoke(app, ["data", "make", "colored-digits", "--out", str(tmp_path / "y"), "--stroke-bias", "0.8"])
    assert isinstance(res.exception, InvdiffError) and "only for styled-digits" in str(res.exception)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(InvdiffError, match="--stroke-bias"):
        RECIPES["styled-digits"](tmp_path / "z", stroke_bias=-0.1)


@pytest.mark.slow
def test_pretrain_init_from_keeps_vae_and_finetunes_unet(tmp_path):
    """`--init-from`: tokenizer/VAE/scaling kept byte-for-byte, UNet moves, the manifest names the start model;
    a start model whose tokenizer lacks the prompts' words is refused."""
    import torch

    from invdiff_rt.models.loader import load_model
    from invdiff_rt.models.pretrain import PretrainConfig, pretrain
    from invdiff_rt.models.tiny import save_random_model

    data = RECIPES["styled-digits"](tmp_path / "data", seed=1)
    prompts = [f"a photo of the digit {d}" for d in range(10)]
    start = load_model(save_random_model(tmp_path / "start", prompts, seed=0))
    cfg = PretrainConfig(steps=2, batch=4, warmup=1, checkpoint_every=2, ema_decay=0.0)
    out = pretrain(data, tmp_path / "tuned", cfg, init_from=tmp_path / "start")
    tuned = load_model(out)
    for a, b in zip(start.vae.state_dict().values(), tuned.vae.state_dict().values()):
        assert torch.equal(a, b)
    assert tuned.scaling_factor == start.scaling_factor
    assert tuned.tokenize(prompts).tolist() == start.tokenize(prompts).tolist()
    moved = [not torch.equal(a, b) for a, b in zip(start.unet.state_dict().values(), tuned.unet.state_dict().values())]
    assert sum(moved) > len(moved) // 2
    info = json.loads((out / "invdiff_model.json").read_text())
    assert info["init_from"] == {"model": str(tmp_path / "start"), "fingerprint": start.fingerprint}
    assert info["resumed_from_step"] == {"vae": None, "unet": 0} and info["arch"]["vae_channels"] == [8, 16, 16]
    save_random_model(tmp_path / "other", ["a photo of a circle"], seed=0)
    with pytest.raises(InvdiffError, match="--init-from .*does not know the words"):
        pretrain(data, tmp_path / "x", cfg, init_from=tmp_path / "other")
    manifest = tmp_path / "start" / "invdiff_model.json"  # a model made elsewhere (build-sd) records no arch
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in record.items() if k != "arch"}))
    with pytest.raises(InvdiffError, match="--init-from .*records no mini-SD architecture"):  # was KeyError 'arch'
        pretrain(data, tmp_path / "y", cfg, init_from=tmp_path / "start")
    manifest.write_text(json.dumps({**record, "arch": {**record["arch"], "heads": 2}}))  # was a TypeError
    with pytest.raises(InvdiffError, match="--init-from .*records no mini-SD architecture .*with MiniSDArch's fields"):
        pretrain(data, tmp_path / "z", cfg, init_from=tmp_path / "start")


def test_per_attribute_classifier_layout(tmp_path):
    """A classifier folder with a shared `class/` and one folder per attribute column: eval loads `<column>/` for
    --attribute <column>, and the shipped styled-digits folder resolves for both columns."""
    from invdiff_rt.eval import classifiers, evaluate

    for name, n_out, column in (("class", 10, "text"), ("color", 2, "color"), ("stroke", 2, "stroke")):
        net = classifiers.SmallCNN(3, n_out, width=4, feature_dim=8)
        labels = [f"a photo of the digit {d}" for d in range(10)] if name == "class" else ["a", "b"]
        classifiers.save_classifier(tmp_path / "cls" / name, net, {"kind": name, "attribute": column, "labels": labels})
    attr, cls = classifiers.load_classifier_pair(tmp_path / "cls", "stroke")
    assert attr.meta["attribute"] == "stroke" and cls.meta["kind"] == "class"
    assert classifiers.load_classifier_pair(tmp_path / "cls", "color")[0].meta["attribute"] == "color"
    with pytest.raises(InvdiffError, match="no attribute/ classifier"):
        classifiers.load_classifier_pair(tmp_path / "cls", "digit")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"recipe": "styled-digits"}))
    shipped = classifiers.default_classifier_dir("styled-digits")
    for column in ("color", "stroke"):
        assert evaluate.resolve_classifier_dir(tmp_path / "data", None, column) == shipped
        attr, cls = classifiers.load_classifier_pair(shipped, column)
        assert attr.meta["attribute"] == column and attr.meta["balanced_accuracy"] >= 0.95
        assert cls.meta["strip_colour"] == "max-min"


def test_oracle_groups_from_both_columns_balance_each_attribute(styled):
    """`--oracle-groups-from color,stroke`: per digit, each attribute's minority carries half the sampling mass."""
    import torch

    from invdiff_rt.method import grouper

    train = read_split(styled, "train")
    prompt_ids = torch.tensor([r.attrs["digit"] for r in train])
    flags = grouper.hidden_minority(styled, "color,stroke", prompt_ids)
    assert flags.shape == (N_TRAIN, 2)
    assert flags[:, 1].tolist() == [r.attrs["minority_stroke"] for r in train]
    g = grouper.group_from_flags(flags, prompt_ids, "invdiff-rt")
    assert g.weights.shape == (N_TRAIN, 4) and g.inferred.tolist() == [r.attrs["minority"] for r in train]
    s = g.sampling.double()
    for digit in range(10):
        sel = prompt_ids == digit
        assert s[sel].sum().item() == pytest.approx(int(sel.sum()), rel=1e-6)
        for a in range(2):
            assert s[sel & flags[:, a]].sum().item() / s[sel].sum().item() == pytest.approx(0.5, abs=1e-4)
