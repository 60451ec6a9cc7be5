"""Load a latent diffusion model from a diffusers directory: the same code path for Stable Diffusion checkpoints
and for the embedded mini-SD models that ship inside the package (addressable by name)."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..artifacts import fingerprint_dir, fingerprint_files, read_json
from ..errors import InvdiffError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"
BUILTIN_MODELS = ("colored-digits", "shapes-habitats", "styled-digits")
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHTED = ("unet", "vae", "text_encoder")
_HASHED = (".safetensors", ".json", ".txt", ".bin")  # weights, configs, vocabularies
_EXTRA_CONDITIONING = ("addition_embed_type", "class_embed_type", "num_class_embeds")
_PLAIN = re.compile(r"(diffusion_pytorch_model|pytorch_model|model)(-\d+-of-\d+)?\.(safetensors|bin)")
_VARIANT = re.compile(r"(diffusion_pytorch_model|model)\.(\w+?)(-\d+-of-\d+)?\.(safetensors|bin)")


def resolve_model(name_or_path: str | Path, flag: str = "--model") -> Path:
    """A built-in model name or a path to a diffusers directory -> the directory (errors name `flag`)."""
    if str(name_or_path) in BUILTIN_MODELS:
        path = ASSETS / str(name_or_path)
        if not (path / "model_index.json").exists():
            raise InvdiffError(f"{flag} {name_or_path}: built-in model is not shipped in this install ({path})")
        return path
    path = Path(name_or_path)
    check_not_single_file(flag, path)
    if not (path / "model_index.json").exists():
        raise InvdiffError(
            f"{flag} {name_or_path}: not a diffusers model directory (no model_index.json); "
            f"pass a directory or one of {', '.join(BUILTIN_MODELS)}"
        )
    missing = [c for c in _COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise InvdiffError(f"{flag} {path}: missing component folder(s) {', '.join(missing)}")
    _check_weights(path, flag)
    _check_text_to_image(path, flag)
    return path


def _check_weights(path: Path, flag: str) -> None:
    """Every weighted component holds a weights file (plain, sharded or a variant), named before diffusers'
    message about the one file it looked for last."""
    for name in _WEIGHTED:
        if not any(_PLAIN.fullmatch(p.name) or _VARIANT.fullmatch(p.name) for p in (path / name).iterdir()):
            raise InvdiffError(f"{flag} {path}: {name}/ holds no weights file (*.safetensors); copy the folder "
                               "whole from the checkpoint")


def check_not_single_file(flag: str, path: Path) -> None:
    """A single-file SD checkpoint (as users download it) is named as such, with the one conversion it needs."""
    if path.is_file() and path.suffix in (".safetensors", ".ckpt"):
        raise InvdiffError(f"{flag} {path}: a single-file checkpoint; convert it to a diffusers folder once "
                           "(diffusers: `StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR)`), then "
                           "pass DIR")


def _check_text_to_image(path: Path, flag: str) -> None:
    """Refuse, before any weight loads, a UNet that needs more than (latents, t, text): SDXL's added conditioning,
    an upscaler's or unCLIP's class embedding, an inpainting or depth model's extra input channels."""
    config = read_json(path / "unet" / "config.json", "UNet config", "use the model's unet/config.json")
    why = next((key for key in _EXTRA_CONDITIONING if config.get(key)), None)
    if why is None and config.get("in_channels", 4) != config.get("out_channels", 4):
        why = "in_channels"
    if why:
        raise InvdiffError(f"{flag} {path}: unet/config.json has {why} {config[why]!r}; invdiff runs text-to-image "
                           f"SD 1.x/2.x UNets (not SDXL, upscaling, inpainting or depth models)")


def weights_variant(folder: Path) -> str | None:
    """The variant of a component's weights when it ships only a variant (`model.fp16.safetensors`, as Hugging Face
    repositories offer SD in fp16), which `from_pretrained(variant=...)` reads; None for plain weights."""
    names = [p.name for p in folder.iterdir()]
    if any(_PLAIN.fullmatch(n) for n in names):
        return None
    found = sorted({m.group(2) for m in map(_VARIANT.fullmatch, names) if m})
    return found[0] if found else None


def model_fingerprint(path: Path) -> str:
    """Content hash of the weights and configs: model_index.json and the component folders (not training logs, nor
    what else the folder holds, e.g. an export to `MODEL/onnx` as Hugging Face repositories lay them out)."""
    path = Path(path)
    files = [p for c in _COMPONENTS for p in (path / c).rglob("*") if p.is_file() and p.suffix in _HASHED
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return fingerprint_files(path, [p.relative_to(path) for p in files] + ["model_index.json"])


def matches_model(recorded: str | None, path: Path | None, fingerprint: str | None = None) -> bool:
    """Whether an artifact's recorded base fingerprint names the model in `path` (`fingerprint`: its own, when
    known); artifacts made before 2026-12-06 name the whole folder's hash (the same for a folder of components)."""
    if recorded == (fingerprint or model_fingerprint(path)):
        return True
    return path is not None and recorded == fingerprint_dir(path, suffixes=_HASHED, exclude=("invdiff_model.json",))


@dataclass
class LatentDiffusionModel:
    path: Path
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict

    @cached_property
    def fingerprint(self) -> str:
        return model_fingerprint(self.path)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (self.unet.config.in_channels, size, size)

    @property
    def image_size(self) -> int:
        return self.latent_shape[1] * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE factor x the UNet's 2^(blocks - 1)."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, prompts)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (posterior mean)."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def make_scheduler(self, name: str = "ddim"):
        from ..runtime.sampling import make_scheduler

        return make_scheduler(self.scheduler_config, name)

    def freeze(self) -> "LatentDiffusionModel":
        for m in (self.text_encoder, self.vae, self.unet):
            m.eval().requires_grad_(False)
        return self


_CHECKED: set[str] = set()  # prompts whose length was checked (encode_text runs once per batch: each is read once)


def unknown_word_prompts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """The prompts holding a word the tokenizer reads as its unknown token: the built-in models' word-level
    vocabularies know only their captions' words ("a cat" and "a dog" would be one prompt). CLIP's byte-level BPE
    has no unknown words (its unk token is its end token)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        return []
    return sorted(p for p in set(prompts) if unk in tokenizer(p, verbose=False).input_ids)


def check_known_words(tokenizer, prompts: Sequence[str], flag: str, fix: str) -> None:
    unknown = unknown_word_prompts(tokenizer, prompts)
    if unknown:
        raise InvdiffError(f"{flag}: the model's tokenizer does not know the words of {unknown[:3]} (read as one "
                           f"unknown token, such prompts cannot be told apart); {fix}")


def tokenize(tokenizer, prompts: Sequence[str], return_tensors: str = "pt"):
    """Token ids [B, model_max_length], padded; a longer prompt is truncated (CLIP reads 77 tokens in SD), with one
    note on stderr per prompt, as diffusers' pipelines warn. Every backend encodes its prompts through here."""
    _note_truncated(tokenizer, prompts)
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors=return_tensors).input_ids


def _note_truncated(tokenizer, prompts: Sequence[str]) -> None:
    limit = tokenizer.model_max_length
    for prompt in dict.fromkeys(p for p in prompts if p not in _CHECKED):
        _CHECKED.add(prompt)
        n = len(tokenizer(prompt, verbose=False).input_ids)  # verbose: no warning of its own
        if n > limit:
            shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            logging.getLogger(__name__).warning(f"note: prompt {shown!r} has {n} tokens; the text encoder reads the "
                                                f"first {limit}, the rest is ignored")


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' log silenced (it logs a missing weights file as an error, then falls back), as it was after."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, flag: str = "--model") -> LatentDiffusionModel:
    """Load tokenizer, text encoder, VAE, UNet and scheduler config; everything frozen and in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    path = resolve_model(name_or_path, flag)
    transformers_logging.disable_progress_bar()  # its "Loading weights" bar on stderr, before a one-line error too
    try:
        with _quiet_diffusers():  # its notes on a missing weights file, before the one-line error
            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
            text_encoder, vae, unet = (cls.from_pretrained(path / name, torch_dtype=dtype,
                                                           variant=weights_variant(path / name))
                                       for cls, name in ((CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae"),
                                                         (UNet2DConditionModel, "unet")))
    except (OSError, ValueError) as e:
        raise InvdiffError(f"{flag} {path}: cannot load ({str(e).splitlines()[0]})") from e
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    model = LatentDiffusionModel(path, tokenizer, text_encoder.to(device), vae.to(device), unet.to(device),
                                 scheduler_config)
    _check_configs(model, path)
    return model.freeze()


def _check_configs(model: LatentDiffusionModel, path: Path) -> None:
    """The scheduler and UNet config fields sampling reads are usable (hand-edited ones failed at the first step)."""
    from ..runtime.sampling import check_scheduler_config

    try:
        check_scheduler_config(model.scheduler_config)
    except ValueError as e:
        raise InvdiffError(f"{path / 'scheduler' / 'scheduler_config.json'}: {e}; restore it from the "
                           "checkpoint") from e
    try:
        shape = model.latent_shape
    except (TypeError, IndexError):  # sample_size null or []
        shape = (None,)
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise InvdiffError(f"{path / 'unet' / 'config.json'}: sample_size {model.unet.config.sample_size!r} is not a "
                           "positive int; restore it from the checkpoint")
