"""Build and save a Stable-Diffusion-format model directory from components (random weights for tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import FOLDER_MARKERS, atomic_dir, atomic_write_json
from .configs import SCHEDULER_CONFIG, MiniSDArch, TinyArch
from .tokenizer import build_tokenizer

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.30.0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_components(arch: MiniSDArch, prompts: list[str], seed: int = 0):
    """Fresh (random) tokenizer, text encoder, VAE and UNet for an architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(prompts, arch.max_tokens)
    ids = tokenizer.convert_tokens_to_ids([tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token])
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=ids[0], bos_token_id=ids[1],
                              eos_token_id=ids[2], **arch.text_kwargs())
    return tokenizer, CLIPTextModel(text_cfg), AutoencoderKL(**arch.vae_kwargs()), \
        UNet2DConditionModel(**arch.unet_kwargs())


def save_model_dir(out_dir: str | Path, tokenizer, text_encoder, vae, unet, info: dict | None = None,
                   dtype: torch.dtype = torch.float32, scheduler: dict | None = None) -> Path:
    """Write a diffusers directory that `StableDiffusionPipeline.from_pretrained` and `load_model` both load."""
    from diffusers import DDIMScheduler

    with atomic_dir(out_dir, FOLDER_MARKERS["model"]) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        for name, module in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)):
            if dtype != torch.float32:  # a cast to the fp32 it has prints diffusers' "kept in float32" warning
                module.to(dtype)
            module.save_pretrained(tmp / name, safe_serialization=True)
            if dtype != torch.float32:
                module.to(torch.float32)
        _load_as_float32(tmp / "text_encoder")
        DDIMScheduler(**(scheduler or SCHEDULER_CONFIG)).save_pretrained(tmp / "scheduler")
        (tmp / FOLDER_MARKERS["model"]).write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
        if info is not None:
            atomic_write_json(tmp / "invdiff_model.json", info)
    return Path(out_dir)


def _load_as_float32(folder: Path) -> None:
    """transformers 5 loads a model in its config's dtype: say float32, so that stock
    `StableDiffusionPipeline.from_pretrained(dir)` (no dtype) gets an fp32 text encoder like its fp32 UNet, even
    from fp16 weights (upcast on load, bit-identical to `load_model`)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("dtype", "float32") != "float32":
        path.write_text(json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")


def save_random_model(out_dir: str | Path, prompts: list[str], seed: int = 0, arch: MiniSDArch | None = None) -> Path:
    """A tiny random SD-format model (for tests): loads through the same `load_model` path as real checkpoints."""
    arch = arch or TinyArch()
    tokenizer, text_encoder, vae, unet = build_components(arch, prompts, seed)
    return save_model_dir(out_dir, tokenizer, text_encoder, vae, unet,
                          info={"recipe": "random", "arch": arch.to_json(), "seed": seed})
