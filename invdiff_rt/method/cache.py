"""Frozen-base inputs that never change for a (model, data) pair: the latent of every training image and the text
embedding of every prompt (and of the empty prompt). Computed once, cached on disk keyed by both fingerprints.

Cache folder: $INVDIFF_CACHE_DIR, else ~/.cache/invdiff-rt. A changed model or dataset gives a new key; a corrupt
cache file is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import artifacts

CACHE_VERSION = 3  # 3: mixed-size data at the model's size, captions stripped; 2: VAE batches fixed by the image
# size (1: the caller's --batch-size)


@dataclass
class BaseInputs:
    latents: torch.Tensor  # [N,C,h,w], scaled
    prompt_ids: torch.Tensor  # [N] long, index into prompts
    prompts: list[str]  # sorted unique captions
    text_embeddings: torch.Tensor  # [P,L,D]
    uncond_embedding: torch.Tensor  # [1,L,D], the empty prompt
    data_fingerprint: str
    base_fingerprint: str


def cache_dir() -> Path:
    return Path(os.environ.get("INVDIFF_CACHE_DIR") or Path.home() / ".cache" / "invdiff-rt")


def cache_path(base_fp: str, data_fp: str, split: str) -> Path:
    key = artifacts.sha256_json({"base": base_fp, "data": data_fp, "split": split, "v": CACHE_VERSION})
    return cache_dir() / "inputs" / f"{key[:32]}.safetensors"


def _load(path: Path, base_fp: str, data_fp: str) -> BaseInputs | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return BaseInputs(t["latents"], t["prompt_ids"], json.loads(meta["prompts"]), t["text_embeddings"],
                          t["uncond_embedding"], data_fp, base_fp)
    except Exception:  # missing, truncated or from another version: recompute
        return None


ENCODE_PIXELS = 256 * 32 * 32  # images per VAE batch x their pixels: 256 at the mini models' 32 px, 1 at SD's 512


@torch.no_grad()
def _encode_latents(model, records) -> torch.Tensor:
    """The VAE's latents of the records, in batches fixed by the image size alone (`ENCODE_PIXELS`): a batch's
    kernels round differently at another batch size, and the cached latents must not depend on which command made
    them (the groups' bytes follow them)."""
    from ..data.folder import load_images
    from ..parallel import map_batches

    size = _encode_size(model, records)
    batch_size = max(1, ENCODE_PIXELS // (size * size))

    def one_batch(start: int) -> torch.Tensor:
        images = load_images(records[start:start + batch_size], size=size)
        return model.encode_images(images).float().cpu()

    return torch.cat(map_batches(one_batch, range(0, len(records), batch_size), model.device))


def _encode_size(model, records) -> int:
    """The dataset's own (square) image size when every image has it and it is at most the model's and a multiple of
    its total downsampling (e.g. 256 px data for SD at 512: shapes and targets as at full size, a quarter of the
    cost), else the model's size (larger, odd-sized or mixed data is resized, as before)."""
    from ..data.folder import native_size

    width, height = native_size(records) or (0, 1)
    multiple = getattr(model, "size_multiple", 0)
    fits = width == height and width <= model.image_size and multiple and width % multiple == 0
    return width if fits else model.image_size


def _compute(model, records, data_fp: str) -> BaseInputs:
    from ..data.folder import prompts_of
    from ..models.loader import check_known_words

    prompts = prompts_of(records)
    check_known_words(model.tokenizer, prompts, "--data", "use a model trained on these captions (`invdiff pretrain "
                      "--data DATA`, or `--init-from` one that knows them)")
    index = {p: i for i, p in enumerate(prompts)}
    prompt_ids = torch.tensor([index[r.text] for r in records], dtype=torch.long)
    text = model.encode_text(prompts).float().cpu()
    uncond = model.encode_text([""]).float().cpu()
    return BaseInputs(_encode_latents(model, records), prompt_ids, prompts, text, uncond, data_fp,
                      model.fingerprint)


def base_inputs(model, data_dir: str | Path, split: str = "train") -> BaseInputs:
    """Latents, prompt ids and text embeddings of a split, from the cache when the fingerprints match."""
    from ..data.folder import data_fingerprint, read_split

    records = read_split(data_dir, split)
    data_fp = data_fingerprint(data_dir, split)
    path = cache_path(model.fingerprint, data_fp, split)
    cached = _load(path, model.fingerprint, data_fp) if path.exists() else None
    if cached is not None and cached.latents.shape[0] == len(records):
        return cached
    inputs = _compute(model, records, data_fp)
    tensors = {"latents": inputs.latents, "prompt_ids": inputs.prompt_ids, "text_embeddings": inputs.text_embeddings,
               "uncond_embedding": inputs.uncond_embedding}
    try:
        artifacts.atomic_save_safetensors(tensors, path, metadata={"prompts": json.dumps(inputs.prompts),
                                                                    "base": model.fingerprint, "data": data_fp})
    except OSError as e:  # a cache: the command goes on without it (the next one computes the inputs again)
        logging.getLogger(__name__).warning(f"note: base inputs not cached, {cache_dir()} is not a writable folder "
                                            f"({e.strerror}); set INVDIFF_CACHE_DIR to one")
    return inputs
