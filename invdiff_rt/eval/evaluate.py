"""`evaluate(...)`: generate N images per training prompt, classify them, and score bias, fidelity and quality.

Report keys (see `metrics` for the formulas):
  bias, bias_std            pairwise bias of predicted attribute counts, mean / std over prompts
  bias_filtered             the same over images the class classifier assigns to their prompt (primary number;
                            prompts with no such image are skipped; n_filtered counts the images kept)
  fd                        fairness discrepancy: mean over prompts of ||p_attr - uniform||_2
  fidelity                  share of images the class classifier assigns to their prompt
  majority_share            share of images showing their prompt's majority attribute value in the TRAIN split
  fid, precision, recall    Frechet distance and improved P/R (k=3) in the class classifier's penultimate features,
                            against N test-split images per prompt (drawn deterministically from `seed`)
  per_prompt, n_per_prompt, noise_floor (= 0.8 / sqrt(N): differences in bias below it are sampling noise), settings
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifacts import package_versions, read_json
from ..errors import InvdiffError
from . import metrics
from .classifiers import Classifier, attribute_dir, default_classifier_dir, load_classifier_pair

PR_K = 3


@dataclass
class EvalRun:
    """The JSON report plus the generated images (`[P*N,H,W,3]`, grouped by prompt) for grids."""

    report: dict
    images: np.ndarray
    prompts: list[str]


# ---------------------------------------------------------------- inputs

def resolve_classifier_dir(data_dir: Path, classifier_dir: str | Path | None, attribute: str = "COLUMN") -> Path:
    """`--classifier` if given, else the shipped pair of the built-in recipe that made `data_dir`."""
    if classifier_dir is not None:
        return Path(classifier_dir)
    from ..data.recipes import RECIPES

    manifest = data_dir / "dataset.json"
    recipe = read_json(manifest, "dataset manifest").get("recipe") if manifest.is_file() else None
    train_cmd = f"invdiff classifier train --data {data_dir} --attribute {attribute} --out CLS_DIR"
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise InvdiffError(f"--classifier: required because {data_dir} was not made by a built-in recipe; "
                           f"train one with `{train_cmd}`")
    path = default_classifier_dir(recipe)
    if not attribute_dir(path, attribute).is_dir():
        raise InvdiffError(f"--classifier: no shipped classifier for {recipe} in this install ({path}); "
                           f"train one with `{train_cmd}` and pass --classifier CLS_DIR")
    return path


def check_classifiers(attr: Classifier, cls: Classifier, attribute: str, prompts: Sequence[str],
                      values: Sequence, cls_dir: Path) -> None:
    """The pair must classify this attribute column and know every prompt and attribute value."""
    if attr.meta.get("attribute") != attribute:
        raise InvdiffError(f"--classifier {cls_dir}: trained for attribute {attr.meta.get('attribute')!r}, "
                           f"not {attribute!r}; pass a classifier trained with --attribute {attribute}")
    for clf, wanted, what in ((cls, prompts, "prompts"), (attr, values, f"{attribute} values")):
        missing = [str(v) for v in wanted if v not in clf.labels]
        if missing:
            raise InvdiffError(f"--classifier {cls_dir}: does not know the {what} {missing[:3]}; "
                               f"train one on this dataset with `invdiff classifier train`")


def state_fingerprint(module) -> str:
    """sha256 over a module's parameter names and bytes (identity of an in-memory adapter)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_adapter(adapter: Any, model, load: bool = True) -> tuple[Any, str | None]:
    """None, an adapter directory, or a loaded module -> (module or None, fingerprint or None).

    `load=False` only fingerprints a directory (the adapter is already baked into a runtime)."""
    if adapter is None:
        return None, None
    if isinstance(adapter, (str, Path)):
        try:
            from ..method.adapter import adapter_fingerprint, load_adapter
        except ModuleNotFoundError as e:
            raise InvdiffError("--adapter: adapters are not available in this build") from e
        return (load_adapter(adapter, model) if load else None), adapter_fingerprint(adapter)
    return adapter, state_fingerprint(adapter)


def reference_images(data_dir: Path, prompts: Sequence[str], per_prompt: int, seed: int,
                     size: int | None = None) -> np.ndarray:
    """N test-split images per prompt, drawn without replacement when possible, as uint8 `[P*N,H,W,3]`; at `size`
    (the classifiers' input) when given, as `invdiff classifier train` read them (a mixed-size split was refused)."""
    from ..data.folder import load_images, read_split

    test = read_split(data_dir, "test")
    rng = np.random.default_rng(seed)
    chosen = []
    for prompt in prompts:
        pool = [r for r in test if r.text == prompt]
        if not pool:
            raise InvdiffError(f"{data_dir / 'test'}: no images for prompt {prompt!r}; the balanced test split "
                               f"needs every training prompt")
        idx = rng.choice(len(pool), size=per_prompt, replace=per_prompt > len(pool))
        chosen += [pool[i] for i in idx]
    x = load_images(chosen, size=size)
    return ((x.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def train_majorities(records, attribute: str, prompts: Sequence[str]) -> dict[str, Any]:
    """The most frequent attribute value of each prompt in the train split."""
    out = {}
    for prompt in prompts:
        counts = Counter(r.attrs[attribute] for r in records if r.text == prompt)
        out[prompt] = max(sorted(counts, key=str), key=lambda v: counts[v])
    return out


# ---------------------------------------------------------------- scoring (pure)

def _rounded(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _per_prompt(prompt: str, labels: list, counts: np.ndarray, counts_ok: np.ndarray, n: int,
                majority: Any, majority_hits: int) -> dict:
    return {"counts": {str(v): int(c) for v, c in zip(labels, counts)},
            "counts_filtered": {str(v): int(c) for v, c in zip(labels, counts_ok)},
            "fidelity": _rounded(counts_ok.sum() / n), "bias": _rounded(metrics.bias_of_counts(counts)),
            "bias_filtered": _rounded(metrics.bias_of_counts(counts_ok)),
            "fd": _rounded(metrics.fd_of_counts(counts)),
            "train_majority": majority, "majority_share": _rounded(majority_hits / n)}


def score_predictions(prompts: Sequence[str], per_prompt: int, attr_labels: Sequence, attr_pred: np.ndarray,
                      class_ok: np.ndarray, majorities: dict[str, Any]) -> dict:
    """Bias, FD, fidelity and majority share from per-image predictions (images grouped by prompt, N each)."""
    n_prompts, labels = len(prompts), list(attr_labels)
    ids = np.repeat(np.arange(n_prompts), per_prompt)
    attr_pred, class_ok = np.asarray(attr_pred), np.asarray(class_ok, bool)
    counts = metrics.count_matrix(ids, attr_pred, n_prompts, len(labels))
    counts_ok = metrics.count_matrix(ids[class_ok], attr_pred[class_ok], n_prompts, len(labels))
    majority_idx = np.array([labels.index(majorities[p]) for p in prompts])
    hits = attr_pred == majority_idx[ids]
    bias, bias_std = metrics.bias(counts)
    return {
        "bias": _rounded(bias), "bias_std": _rounded(bias_std),
        "bias_filtered": _rounded(metrics.bias(counts_ok)[0]), "fd": _rounded(metrics.fairness_discrepancy(counts)),
        "fidelity": _rounded(class_ok.mean()), "n_filtered": int(class_ok.sum()),
        "majority_share": _rounded(hits.mean()),
        "per_prompt": {p: _per_prompt(p, labels, counts[i], counts_ok[i], per_prompt, majorities[p],
                                      int(hits[ids == i].sum())) for i, p in enumerate(prompts)},
    }


def score_quality(fake_features: np.ndarray, real_features: np.ndarray, k: int = PR_K) -> dict:
    """FID and improved precision / recall between generated and reference features."""
    precision, recall = metrics.precision_recall(real_features, fake_features, k=k)
    return {"fid": _rounded(metrics.frechet_distance(fake_features, real_features)),
            "precision": _rounded(precision), "recall": _rounded(recall)}


def score_images(images: np.ndarray, real: np.ndarray, prompts: Sequence[str], per_prompt: int,
                 attr_clf: Classifier, class_clf: Classifier, majorities: dict[str, Any]) -> dict:
    """Every metric of the report for uint8 `images` grouped by prompt (N each) against reference `real`."""
    class_idx = np.repeat([class_clf.labels.index(p) for p in prompts], per_prompt)
    report = score_predictions(prompts, per_prompt, attr_clf.labels, attr_clf.predict(images),
                               class_clf.predict(images) == class_idx, majorities)
    report.update(score_quality(class_clf.features(images), class_clf.features(real)))
    report.update({"n_per_prompt": per_prompt, "n_images": int(len(images)),
                   "noise_floor": _rounded(0.8 / math.sqrt(per_prompt)),
                   "attribute_values": [str(v) for v in attr_clf.labels]})
    return report


# ---------------------------------------------------------------- the run

def _as_model(model):
    if isinstance(model, (str, Path)):
        from ..models.loader import load_model

        return load_model(model)
    return model


def generate_images(model_or_runtime, prompts: Sequence[str], per_prompt: int, seed: int,
                    **sampling: Any) -> np.ndarray:
    """N images per prompt via `sample_images`, grouped by prompt (index 0..N-1 within each)."""
    from ..runtime.sampling import sample_images

    flat_prompts = [p for p in prompts for _ in range(per_prompt)]
    indices = [i for _ in prompts for i in range(per_prompt)]
    return sample_images(model_or_runtime, flat_prompts, indices, seed, **sampling)


def _sampling_settings(model, adapter_fp: str | None, adapter_weight: float, seed: int, steps: int,
                       guidance: float, scheduler: str, denoiser: Any) -> dict:
    return {"model_fingerprint": getattr(model, "fingerprint", None), "adapter_fingerprint": adapter_fp,
            "adapter_weight": float(adapter_weight) if adapter_fp is not None else None, "seed": seed,
            "steps": steps, "guidance_scale": guidance, "scheduler": scheduler,
            "backend": getattr(denoiser, "name", type(denoiser).__name__) if denoiser is not None else "torch"}


def run_evaluation(model, data_dir: str | Path, attribute: str, classifier_dir: str | Path | None = None,
                   per_prompt: int = 64, seed: int = 0, *, steps: int = 25, guidance_scale: float | None = None,
                   scheduler: str = "ddim", batch_size: int = 64, adapter: Any = None, adapter_weight: float = 1.0,
                   denoiser: Any = None, latent_shape: Any = None) -> EvalRun:
    """Everything `evaluate` does, also returning the generated images (for grids). `latent_shape`: another
    size than the model's (from `--height/--width`; the classifiers resize their input)."""
    from ..data.folder import attribute_values, data_fingerprint, prompts_of, read_split
    from ..models.loader import check_known_words
    from ..runtime.sampling import DEFAULT_GUIDANCE

    if per_prompt < 1:
        raise InvdiffError(f"--per-prompt {per_prompt}: must be at least 1")
    data_dir = Path(data_dir)
    train = read_split(data_dir, "train")
    prompts = prompts_of(train)
    try:
        values = attribute_values(train, attribute)
    except InvdiffError as err:
        raise InvdiffError(f"--attribute {attribute}: {err}") from err
    if len(prompts) * per_prompt < 2:
        raise InvdiffError(f"--per-prompt {per_prompt}: {data_dir / 'train'} has one prompt, so one image; FID "
                           "compares two or more (pass --per-prompt 2 or more)")
    cls_dir = resolve_classifier_dir(data_dir, classifier_dir, attribute)
    attr_clf, class_clf = load_classifier_pair(cls_dir, attribute)
    check_classifiers(attr_clf, class_clf, attribute, prompts, values, cls_dir)
    real = reference_images(data_dir, prompts, per_prompt, seed, size=attr_clf.meta["input_size"])
    model = _as_model(model)
    check_known_words(model.tokenizer, prompts, f"--data {data_dir}", "evaluate a model trained on these captions")
    adapter_module, adapter_fp = resolve_adapter(adapter, model, load=denoiser is None)
    guidance = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
    start = time.perf_counter()
    images = generate_images(model if denoiser is None else denoiser, prompts, per_prompt, seed, steps=steps,
                             guidance_scale=guidance, scheduler=scheduler,
                             adapter=adapter_module if denoiser is None else None,
                             adapter_weight=adapter_weight, batch_size=batch_size, latent_shape=latent_shape)
    seconds = time.perf_counter() - start
    report = score_images(images, real, prompts, per_prompt, attr_clf, class_clf,
                          train_majorities(train, attribute, prompts))
    report.update({
        "attribute": attribute, "prompts": list(prompts), "generation_seconds": round(seconds, 3),
        "settings": {**_sampling_settings(model, adapter_fp, adapter_weight, seed, steps, guidance, scheduler,
                                          denoiser),
                     "data_fingerprint": data_fingerprint(data_dir, "train"), "classifier_dir": str(cls_dir),
                     "latent_shape": list(latent_shape) if latent_shape else None,
                     "classifier_weights": {"attribute": attr_clf.meta["weights_sha256"],
                                            "class": class_clf.meta["weights_sha256"]},
                     "versions": package_versions()},
    })
    return EvalRun(report, images, list(prompts))


def evaluate(model, data_dir: str | Path, attribute: str, classifier_dir: str | Path | None = None,
             per_prompt: int = 64, seed: int = 0, *, steps: int = 25, guidance_scale: float | None = None,
             scheduler: str = "ddim", batch_size: int = 64, adapter: Any = None, adapter_weight: float = 1.0,
             denoiser: Any = None) -> dict:
    """Generate `per_prompt` images per training prompt and return the JSON-ready report (see module doc).

    `model`: a loaded `LatentDiffusionModel` or a model name/path (its fingerprint is recorded).
    `adapter`: an adapter directory or a loaded module. `denoiser`: an optional backend runtime (ONNX Runtime /
    TensorRT, see `runtime.sampling.Runtime`) that generates instead of `model`; its adapter is baked in, so then
    `adapter` (a directory) is only fingerprinted. `guidance_scale=None` uses the sampler's default (3.0).
    """
    return run_evaluation(model, data_dir, attribute, classifier_dir, per_prompt, seed, steps=steps,
                          guidance_scale=guidance_scale, scheduler=scheduler, batch_size=batch_size,
                          adapter=adapter, adapter_weight=adapter_weight, denoiser=denoiser).report
