"""Evaluation classifiers: a small CNN for the attribute and a colour-blind one for the class (prompt).

A classifier directory holds `model.safetensors` + `classifier.json`. A classifier *pair* directory (what
`invdiff classifier train --out CLS_DIR` writes, and what ships in `invdiff_rt/assets/classifiers/<benchmark>/`)
holds `attribute/` and `class/`. Both are trained on the real, labelled train split with every
(class, attribute) cell given equal total loss weight, so neither can lean on the spurious correlation; the class
classifier also sees colour-stripped images (see `strip_colour`) so it cannot read the attribute from hue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..artifacts import atomic_save_safetensors, atomic_write_json, package_versions, read_json, sha256_file
from ..errors import InvdiffError

FORMAT = "invdiff-classifier"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "classifier.json"
KINDS = ("attribute", "class")
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "classifiers"
MAX_SHIFT = 2


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks -> 4x4 pool -> `feature_dim` penultimate features -> logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_conv_block(in_channels, w), nn.MaxPool2d(2),
            *_conv_block(w, 2 * w), nn.MaxPool2d(2),
            *_conv_block(2 * w, 2 * w), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(2 * w * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def seeded_cnn(in_channels: int, num_classes: int, seed: int, width: int = 16) -> SmallCNN:
    """A SmallCNN initialised from `seed`, leaving the global torch RNG as it was (callers' own draws unchanged)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(in_channels, num_classes, width)


STRIP_MODES = ("none", "max", "max-min")
DEFAULT_STRIP = "max-min"


def strip_colour(x: torch.Tensor, mode: str = DEFAULT_STRIP) -> torch.Tensor:
    """Drop hue from `[N,3,H,W]`: "max" -> `[N,1,H,W]` max over RGB; "max-min" -> `[N,2,H,W]` max and min over RGB.

    Both are invariant to permuting the RGB channels (pure red and pure green strokes look identical). "max-min"
    keeps shapes visible on saturated backgrounds, where "max" alone loses them (a red disc on blue water).
    """
    if mode == "none":
        return x
    if mode == "max":
        return x.amax(dim=1, keepdim=True)
    if mode == "max-min":
        return torch.cat([x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)], dim=1)
    raise InvdiffError(f"--strip {mode}: unknown colour stripping; choose one of {', '.join(STRIP_MODES)}")


def to_model_input(images: Any, input_size: int, strip: str = "none") -> torch.Tensor:
    """uint8 `[N,H,W,3]` (numpy) or float `[N,3,H,W]` in [-1,1] (torch) -> the classifier's float input."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InvdiffError(f"classifier input: expected uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        x = images.float()
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    return strip_colour(x, strip)


@dataclass
class Classifier:
    """A loaded classifier: the network plus its manifest (labels, input size, colour stripping, ...)."""

    net: SmallCNN
    meta: dict

    @property
    def labels(self) -> list:
        return list(self.meta["labels"])

    def _run(self, images: Any, fn, batch_size: int = 256) -> np.ndarray:
        x = to_model_input(images, self.meta["input_size"], self.meta["strip_colour"])
        self.net.eval()
        with torch.no_grad():
            out = [fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy()

    def predict(self, images: Any) -> np.ndarray:
        """Label indices `[N]` (int64) into `self.labels`."""
        return self._run(images, self.net).argmax(axis=1).astype(np.int64)

    def features(self, images: Any) -> np.ndarray:
        """Penultimate features `[N, feature_dim]` as float64 (for FID and precision/recall)."""
        return self._run(images, self.net.features).astype(np.float64)


# ---------------------------------------------------------------- training

def cell_weights(targets: Sequence[int], confounds: Sequence[int]) -> torch.Tensor:
    """Per-sample weights (mean 1) giving every (target, confound) cell the same total weight."""
    cells = np.asarray(targets, np.int64) * (int(np.max(confounds)) + 1) + np.asarray(confounds, np.int64)
    _, inverse, sizes = np.unique(cells, return_inverse=True, return_counts=True)
    w = len(cells) / (len(sizes) * sizes[inverse])
    return torch.as_tensor(w, dtype=torch.float32)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Shift each image by up to `max_shift` px in x and y (edge-replicated padding)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


LR = 2e-3  # Adam's learning rate in `fit`


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, epochs: int, seed: int,
        batch_size: int = 64, lr: float = LR, loss_fn=F.cross_entropy, params=None) -> float:
    """Weighted `loss_fn` (per sample; default cross-entropy) with Adam + cosine schedule and shift augmentation;
    returns the last epoch's loss. `params`: Adam's parameter groups (default: all of `net`'s at `lr`)."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x) // batch_size)
    opt = torch.optim.Adam(net.parameters() if params is None else params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    net.train()
    last = 0.0
    for _ in range(epochs):
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            w = weights[idx]
            loss = (loss_fn(net(random_shift(x[idx], gen)), y[idx], reduction="none") * w).sum() / w.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        last = total / len(x)
    net.eval()
    return last


def balanced_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over the classes present in `target` of the per-class recall."""
    pred, target = np.asarray(pred), np.asarray(target)
    return float(np.mean([(pred[target == c] == c).mean() for c in np.unique(target)]))


def worst_cell_accuracy(pred: np.ndarray, target: np.ndarray, confound: np.ndarray) -> float:
    """Lowest accuracy over the (target, confound) cells present (reveals shortcut learning)."""
    pred, target, confound = map(np.asarray, (pred, target, confound))
    cells = {(t, c) for t, c in zip(target.tolist(), confound.tolist())}
    return float(min((pred[(target == t) & (confound == c)] == t).mean() for t, c in cells))


def train_one(x: torch.Tensor, y: np.ndarray, confound: np.ndarray, num_classes: int, strip: str,
              epochs: int, seed: int, width: int = 16) -> tuple[SmallCNN, float]:
    """Train one SmallCNN on float `[N,3,H,W]` images in [-1,1] (stripped by `strip`), cell-balanced loss."""
    inputs = strip_colour(x, strip)
    net = seeded_cnn(inputs.shape[1], num_classes, seed, width)
    loss = fit(net, inputs, torch.as_tensor(y, dtype=torch.long), cell_weights(y, confound), epochs, seed)
    return net, loss


# ---------------------------------------------------------------- files

def architecture_of(net: SmallCNN) -> dict:
    conv = net.body[0]
    return {"name": "small-cnn", "in_channels": conv.in_channels, "num_classes": net.head.out_features,
            "width": conv.out_channels, "feature_dim": net.head.in_features}


def save_classifier(out_dir: str | Path, net: SmallCNN, meta: dict) -> Path:
    """Write `model.safetensors` and `classifier.json` (format, architecture, weights hash, versions + `meta`)."""
    out_dir = Path(out_dir)
    weights = atomic_save_safetensors(dict(net.state_dict()), out_dir / WEIGHTS, metadata={"format": FORMAT})
    manifest = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": architecture_of(net),
                "weights_sha256": sha256_file(weights), "versions": package_versions()}
    atomic_write_json(out_dir / MANIFEST, manifest)
    return out_dir


def load_classifier(directory: str | Path) -> Classifier:
    """Load one classifier directory (`model.safetensors` + `classifier.json`)."""
    directory = Path(directory)
    meta = read_json(directory / MANIFEST, "classifier manifest")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise InvdiffError(f"{directory / MANIFEST}: not an invdiff classifier (format {meta.get('format')!r}, "
                           f"version {meta.get('format_version')!r}); retrain with `invdiff classifier train`")
    weights = directory / WEIGHTS
    if not weights.is_file() or sha256_file(weights) != meta.get("weights_sha256"):
        raise InvdiffError(f"{weights}: missing or does not match {MANIFEST}; retrain with `invdiff classifier train`")
    return Classifier(_with_weights(meta, directory / MANIFEST, weights).eval(), meta)


def _with_weights(meta: dict, manifest: Path, weights: Path) -> SmallCNN:
    """The SmallCNN `meta` describes, holding `weights`; a hand-edited architecture or label list is one line."""
    from safetensors.torch import load_file

    labels = meta.get("labels")
    try:
        scalars = isinstance(labels, list) and all(isinstance(v, (str, int, float, type(None))) for v in labels)
        if not (scalars and labels):  # the attribute's values, as `data.folder.attribute_values` reads them
            raise TypeError("labels")
        arch = meta["architecture"]
        net = SmallCNN(arch["in_channels"], arch["num_classes"], arch["width"], arch["feature_dim"])
        net.load_state_dict(load_file(str(weights)))
    except (KeyError, TypeError, RuntimeError) as e:  # missing, mistyped or mis-shaped: not what was trained
        raise InvdiffError(f"{manifest}: its architecture or labels do not fit {WEIGHTS}; restore the "
                           f"{MANIFEST} it was trained with, or retrain with `invdiff classifier train`") from e
    return net


def attribute_dir(cls_dir: Path, attribute: str | None = None) -> Path:
    """`CLS_DIR/attribute`, or `CLS_DIR/<attribute>` in a folder that holds one attribute classifier per column
    beside a shared `class/` (the layout of datasets with several attributes, e.g. styled-digits)."""
    if not (cls_dir / "attribute").is_dir() and attribute and (cls_dir / attribute / MANIFEST).is_file():
        return cls_dir / attribute
    return cls_dir / "attribute"


def load_classifier_pair(cls_dir: str | Path, attribute: str | None = None) -> tuple[Classifier, Classifier]:
    """Load `CLS_DIR/attribute` (or `CLS_DIR/<attribute>`, see `attribute_dir`) and `CLS_DIR/class`."""
    cls_dir = Path(cls_dir)
    dirs = {"attribute": attribute_dir(cls_dir, attribute), "class": cls_dir / "class"}
    missing = [k for k in KINDS if not (dirs[k] / MANIFEST).is_file()]
    if missing and (cls_dir / MANIFEST).is_file():  # one classifier of a pair, not the pair's folder
        raise InvdiffError(f"--classifier {cls_dir}: one classifier of a pair; pass the folder that holds it and "
                           f"class/ ({cls_dir.parent})")
    if missing:
        raise InvdiffError(f"--classifier {cls_dir}: no {'/ and '.join(missing)}/ classifier inside; "
                           f"make one with `invdiff classifier train --data DIR --attribute COLUMN --out {cls_dir}`")
    return load_classifier(dirs["attribute"]), load_classifier(dirs["class"])


def default_classifier_dir(benchmark_name: str) -> Path:
    """Where the shipped classifier pair of a built-in benchmark lives (`assets/classifiers/<name>/`).

    They are produced with `invdiff data make <name> --out D && invdiff classifier train --data D
    --attribute <column> --out invdiff_rt/assets/classifiers/<name>`.
    """
    return ASSETS / benchmark_name


# ---------------------------------------------------------------- the `invdiff classifier train` stage

@dataclass
class LabelledSplit:
    """Images of one split with index-encoded class (prompt) and attribute labels."""

    images: torch.Tensor
    classes: np.ndarray
    attributes: np.ndarray


def _encode(values: Sequence, names: Sequence, where: str, what: str) -> np.ndarray:
    index = {v: i for i, v in enumerate(names)}
    unknown = sorted({str(v) for v in values if v not in index})
    if unknown:
        raise InvdiffError(f"{where}: {what} values {unknown[:5]} are not in the train split; "
                           f"the test split must use the train split's values")
    return np.array([index[v] for v in values], dtype=np.int64)


MIN_SIZE = 8  # px: the smallest images the classifiers (and the readers of `method/drawn.py`) read


def _check_square(records) -> None:
    """The classifiers read square images (`input_size`): a non-square split would be stretched, silently."""
    from ..data.folder import native_size

    width, height = native_size(records) or (0, 0)
    if width != height:
        raise InvdiffError(f"{records[0].file.parent}: images of {width}x{height} pixels; the classifiers take "
                           "square images (crop or pad the dataset to square)")
    if width < MIN_SIZE:  # two of SmallCNN's 2x poolings would leave nothing
        raise InvdiffError(f"{records[0].file.parent}: images of {width}x{height} pixels; the classifiers take "
                           f"at least {MIN_SIZE}x{MIN_SIZE} (resize the dataset)")


def labelled_split(data_dir: Path, split: str, attribute: str, prompts: list, values: list,
                   size: int | None = None) -> LabelledSplit:
    from ..data.folder import attribute_of, load_images, read_split

    records = read_split(data_dir, split)
    where = str(data_dir / split)
    return LabelledSplit(load_images(records, size),
                         _encode([r.text for r in records], prompts, where, "text"),
                         _encode(attribute_of(records, attribute), values, where, f'"{attribute}"'))


def _scores(clf: Classifier, x: torch.Tensor, target: np.ndarray, confound: np.ndarray) -> dict:
    pred = clf.predict(x)
    return {"balanced_accuracy": balanced_accuracy(pred, target),
            "worst_cell_accuracy": worst_cell_accuracy(pred, target, confound)}


def train_classifier_pair(data_dir: str | Path, attribute: str, out_dir: str | Path, epochs: int = 8,
                          seed: int = 0, strip: str = DEFAULT_STRIP) -> dict:
    """Train the attribute and class classifiers on `train/`, score them on `test/`, write `out_dir/{attribute,class}`.

    Returns `{"attribute": manifest, "class": manifest}`.
    """
    from ..artifacts import FOLDER_MARKERS, atomic_dir
    from ..data.folder import attribute_values, data_fingerprint, prompts_of, read_split

    data_dir = Path(data_dir)
    strip_colour(torch.zeros(1, 3, 1, 1), strip)  # validates the mode
    if epochs < 1:
        raise InvdiffError(f"--epochs {epochs}: must be at least 1")
    train_records = read_split(data_dir, "train")
    prompts, values = prompts_of(train_records), attribute_values(train_records, attribute)
    if len(values) < 2 or len(prompts) < 2:
        raise InvdiffError(f'{data_dir / "train"}: need >= 2 prompts and >= 2 values of "{attribute}" '
                           f"(found {len(prompts)} and {len(values)}); pick another --attribute")
    _check_square(train_records)
    train = labelled_split(data_dir, "train", attribute, prompts, values)
    test = labelled_split(data_dir, "test", attribute, prompts, values, size=train.images.shape[-1])
    common = {"attribute": attribute, "input_size": int(train.images.shape[-1]),
              "data_fingerprint": data_fingerprint(data_dir, "train"),
              "test_fingerprint": data_fingerprint(data_dir, "test"),
              "training": {"epochs": epochs, "seed": seed, "n_images": len(train.images),
                           "augment": f"random shift +-{MAX_SHIFT}px",
                           "loss_weighting": "equal total weight per (class, attribute) cell"}}
    jobs = {"attribute": (values, train.attributes, train.classes, test.attributes, test.classes, "none"),
            "class": (prompts, train.classes, train.attributes, test.classes, test.attributes, strip)}
    manifests = {}
    with atomic_dir(out_dir, FOLDER_MARKERS["classifiers"]) as tmp:
        for kind, (labels, y, conf, y_test, conf_test, stripped) in jobs.items():
            net, loss = train_one(train.images, y, conf, len(labels), stripped, epochs, seed)
            meta = {**common, "kind": kind, "target": attribute if kind == "attribute" else "text",
                    "labels": list(labels), "strip_colour": stripped, "final_train_loss": loss}
            meta.update(_scores(Classifier(net, meta), test.images, y_test, conf_test))
            save_classifier(tmp / kind, net, meta)
            manifests[kind] = read_json(tmp / kind / MANIFEST)
    return manifests
