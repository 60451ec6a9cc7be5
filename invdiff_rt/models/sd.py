"""Offline Stable-Diffusion-class checkpoints: the exact SD-1.5 / SD-2.1 UNet, VAE and text-encoder configs with
random, seeded weights (nothing is downloaded). For real-scale benchmarks and `slow` tests; built on demand.

The configs are the published `config.json` values of `runwayml/stable-diffusion-v1-5` and
`stabilityai/stable-diffusion-2-1` (UNet, VAE, CLIP ViT-L/14 text model; OpenCLIP ViT-H/14 text tower dims for
2.1). Only the tokenizer differs: a word-level tokenizer (`models/tokenizer.py`) with `model_max_length` 77, so
the token-embedding table is small; every other weight has SD's shape.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..artifacts import package_versions
from ..errors import InvdiffError
from .configs import SCHEDULER_CONFIG
from .tokenizer import build_tokenizer

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD21_UNET = {**SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
             "use_linear_projection": True, "upcast_attention": True}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
SD21_VAE = {**SD15_VAE, "sample_size": 768}
SD15_TEXT = {  # CLIP ViT-L/14 text model (vocab_size is the word-level tokenizer's)
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
}
SD21_TEXT = {  # OpenCLIP ViT-H/14 text tower, penultimate layer (diffusers' SD 2.x text_encoder has 23 layers)
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
    "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 512,
}
VARIANTS = {
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT, "prediction_type": "epsilon"},
    "sd21": {"unet": SD21_UNET, "vae": SD21_VAE, "text": SD21_TEXT, "prediction_type": "v_prediction"},
}
PROMPTS = ("a photo of a cat", "a photo of a dog", "a red car on a street", "a bird on water",
           "a bird on land", "a painting of a house", "a blue square", "a green circle")


def variant(name: str) -> dict:
    if name not in VARIANTS:
        raise InvdiffError(f"--variant {name}: unknown; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fast, seeded init (no per-layer kaiming over 860M params): weights ~ N(0, 1/fan_in), biases 0,
    norm scales 1; in parameter order, from one generator."""
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_params = {id(p) for m in module.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in norm_params:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() < 2:
                p.zero_()
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
    return module


def build_sd_components(name: str, seed: int = 0, prompts=PROMPTS):
    """(tokenizer, text encoder, VAE, UNet) of a variant, built on the meta device and filled by `seeded_init_`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = variant(name)
    tokenizer = build_tokenizer(prompts, 77)
    ids = tokenizer.convert_tokens_to_ids([tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token])
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=ids[0], bos_token_id=ids[1],
                              eos_token_id=ids[2], **spec["text"])
    with torch.device("meta"):
        modules = [CLIPTextModel(text_cfg), AutoencoderKL(**spec["vae"]), UNet2DConditionModel(**spec["unet"])]
    modules = [m.to_empty(device="cpu") for m in modules]
    for i, m in enumerate(modules):
        seeded_init_(m, seed * 3 + i)
        _reset_buffers(m)
    return (tokenizer, *modules)


def _reset_buffers(module: torch.nn.Module) -> None:
    """Non-persistent buffers left empty by `to_empty` (CLIP's position_ids)."""
    for mod in module.modules():
        if hasattr(mod, "position_ids") and isinstance(mod.position_ids, torch.Tensor):
            mod.position_ids.copy_(torch.arange(mod.position_ids.shape[-1]).expand_as(mod.position_ids))


def build_sd(name: str, out: str | Path, seed: int = 0) -> Path:
    """Write an SD-class diffusers directory (fp32 safetensors) that `load_model` and stock diffusers load."""
    from .tiny import save_model_dir

    spec = variant(name)
    tokenizer, text_encoder, vae, unet = build_sd_components(name, seed)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in
              (("text_encoder", text_encoder), ("vae", vae), ("unet", unet))}
    info = {"recipe": f"random-{name}", "variant": name, "seed": seed, "params": params,
            "prediction_type": spec["prediction_type"], "sample_size": unet.config.sample_size,
            "cross_attention_dim": unet.config.cross_attention_dim, "weights_dtype": "float32",
            "versions": package_versions()}
    scheduler = {**SCHEDULER_CONFIG, "prediction_type": spec["prediction_type"]}
    return save_model_dir(out, tokenizer, text_encoder, vae, unet, info=info, scheduler=scheduler)
