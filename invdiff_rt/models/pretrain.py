"""Train the embedded mini Stable-Diffusion model on a dataset's `train/` split.

Stage 1 trains the VAE (MSE + L1 reconstruction, tiny KL). Stage 2 freezes it, encodes every image once, and trains
the text encoder + UNet jointly with the epsilon-MSE loss of Stable Diffusion, caption dropout (empty prompt) so
that classifier-free guidance works, and an EMA of both. Each stage checkpoints atomically and resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import artifacts
from ..artifacts import package_versions, read_json
from ..data.folder import data_fingerprint, load_images, read_split
from ..errors import InvdiffError
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .configs import SCHEDULER_CONFIG, MiniSDArch
from .loader import tokenize
from .tiny import build_components, save_model_dir


@dataclass(frozen=True)
class PretrainConfig:
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    steps: int = 3500
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    threads: int | None = None


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


_LENGTH_FLAG = {"vae": "--vae-steps", "unet": "--steps"}
_DIVERGED_FIX = {"vae": "a longer --warmup, or check the images of --data (the VAE's learning rate is fixed)",
                 "unet": "a lower --lr or a longer --warmup"}


def _loop(name, total, start, step_fn, ckpt_fn, every, progress):
    """Run `step_fn(step) -> loss` from `start` to `total`, checkpointing every `every` steps; a non-finite loss
    stops it at that step, before anything more is written."""
    if start > total:
        raise InvdiffError(f"{_LENGTH_FLAG[name]} {total}: the {name} checkpoint is already at step {start}; pass "
                           f"{_LENGTH_FLAG[name]} {start} or more, or delete the .ckpt folder next to --out")
    task = progress.add_task(name, total=total, completed=start, loss=float("nan"))
    t0 = time.time()
    for step in range(start, total):
        loss = step_fn(step)
        if not math.isfinite(loss):
            raise InvdiffError(f"pretrain: the {name} loss is {loss} at step {step + 1} (training diverged); delete "
                               f"the .ckpt folder next to --out and rerun with {_DIVERGED_FIX[name]}")
        progress.update(task, advance=1, loss=loss)
        if not progress.console.is_terminal and (step + 1) % 50 == 0:
            rate = (step + 1 - start) / (time.time() - t0)
            progress.console.log(f"{name} step {step + 1}/{total} loss {loss:.4f} ({rate:.2f} steps/s)")
        if (step + 1) % every == 0 or step + 1 == total:
            ckpt_fn(step + 1)


_NOT_IN_KEY = ("steps", "checkpoint_every", "threads")  # a resume may change them (a longer UNet schedule)


def run_key(cfg: PretrainConfig, arch: MiniSDArch, data_fp: str, init_fp: str | None) -> str:
    """What a checkpoint must have been made with to be resumed: the recipe but the UNet's length (the VAE's is in:
    the UNet trains on its latents), the architecture, the data and the starting model."""
    from ..artifacts import sha256_json

    recipe = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    return sha256_json({"recipe": recipe, "arch": arch.to_json(), "data": data_fp, "init": init_fp})


def _resume(ckpt: Path, key: str, modules: dict, opt) -> int:
    """The step a checkpoint continues from (0 without one); one made with other settings is refused (one
    without a key, from before keys, is taken as it was)."""
    if not has_checkpoint(ckpt):
        return 0
    refusal = ("checkpoint was made with other data, --seed, --vae-steps, batch sizes, learning rates, warmup, EMA "
               "decay, architecture or --init-from; rerun with those, or delete it to start over")
    return load_checkpoint(ckpt, modules, opt, (None, key), refusal)["step"]


def train_vae(vae, images: torch.Tensor, cfg: PretrainConfig, ckpt: Path, progress, key: str = "") -> int:
    """Train the VAE in place; returns the step it resumed from (0 for a fresh run)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=1e-4)
    start = _resume(ckpt, key, {"vae": vae}, opt)
    vae.train().requires_grad_(True)

    def step_fn(step: int) -> float:
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine(step, cfg.vae_steps, cfg.warmup)
        g_step = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x = images[torch.randint(0, len(images), (cfg.vae_batch,), generator=g_step)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g_step)).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    _loop("vae", cfg.vae_steps, start, step_fn,
          lambda s: save_checkpoint(ckpt, {"vae": vae}, opt, s, {"key": key}), cfg.checkpoint_every, progress)
    vae.eval().requires_grad_(False)
    return start


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def train_unet(unet, text_encoder, tokenizer, latents, texts, cfg: PretrainConfig, ckpt: Path, progress,
               key: str = ""):
    """Joint text encoder + UNet training; returns the EMA copies and the step it resumed from. A resumed run with
    a larger `steps` continues on the longer cosine schedule (the learning rate jumps back up to its value there)."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    prompts = sorted(set(texts)) + [""]
    ids_of = tokenize(tokenizer, prompts)  # a caption longer than an --init-from model reads: one note
    index = {p: i for i, p in enumerate(prompts)}
    text_index = torch.tensor([index[t] for t in texts])  # a dict: list.index was quadratic (2 min at 100k captions)
    empty = len(prompts) - 1
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    start = _resume(ckpt, key, modules, opt)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)

    def step_fn(step: int) -> float:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(step, cfg.steps, cfg.warmup)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 + step)
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        tid = torch.where(drop, torch.full_like(idx, empty), text_index[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        emb = text_encoder(ids_of[tid])[0]
        loss = F.mse_loss(unet(xt, t, emb).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema_unet, unet, cfg.ema_decay if step > cfg.warmup else 0.0)
        _ema_update(ema_text, text_encoder, cfg.ema_decay if step > cfg.warmup else 0.0)
        return loss.item()

    _loop("unet", cfg.steps, start, step_fn,
          lambda s: save_checkpoint(ckpt, modules, opt, s, {"key": key}), cfg.checkpoint_every, progress)
    return ema_unet.eval(), ema_text.eval(), start


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())


def fit_tokens(arch: MiniSDArch, texts: list[str]) -> MiniSDArch:
    """The architecture with a text encoder long enough for the longest caption (its words, BOS and EOS): at the
    default 16 tokens, captions of more than 14 words were cut silently and could train as the same prompt."""
    from .tokenizer import token_count

    longest = max(token_count(t) for t in set(texts)) + 2
    return replace(arch, max_tokens=longest) if longest > arch.max_tokens else arch


def init_components(init_from: str | Path, texts: list[str]):
    """Tokenizer, text encoder, VAE and UNet (fp32) of an existing model, its arch and the model's fingerprint;
    every prompt must tokenize without unknown words."""
    from .loader import check_known_words, load_model

    model = load_model(init_from, flag="--init-from")
    check_known_words(model.tokenizer, texts, f"--init-from {init_from}", "pretrain from scratch (drop "
                      "--init-from) or pick a model trained on these prompts")
    info = read_json(model.path / "invdiff_model.json", "model manifest")
    fields = {f.name for f in dataclasses.fields(MiniSDArch)}
    if not (isinstance(info.get("arch"), dict) and set(info["arch"]) <= fields):
        raise InvdiffError(f"--init-from {init_from}: {model.path / 'invdiff_model.json'} records no mini-SD "
                           "architecture (`arch`, with MiniSDArch's fields); --init-from takes a model made by "
                           "`invdiff pretrain`")
    arch = MiniSDArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["arch"].items()})
    return (model.tokenizer, model.text_encoder, model.vae, model.unet), arch, model.fingerprint


def pretrain(data_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig = PretrainConfig(),
             arch: MiniSDArch = MiniSDArch(), checkpoint_dir: str | Path | None = None,
             fp16_weights: bool = False, init_from: str | Path | None = None) -> Path:
    """Train VAE, then text encoder + UNet, on `data_dir/train`; write a diffusers directory to `out_dir`.

    With `init_from` (a model folder or built-in name) the tokenizer, text encoder, VAE and UNet start from that
    model: the VAE and its latent scaling are kept as they are (no VAE stage) and text encoder + UNet are fine-tuned.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    records = read_split(data_dir, "train")
    texts = [r.text for r in records]
    init_fp = None
    if init_from is not None:
        (tokenizer, text_encoder, vae, unet), arch, init_fp = init_components(init_from, texts)
    else:
        arch = fit_tokens(arch, texts)
        tokenizer, text_encoder, vae, unet = build_components(arch, texts, cfg.seed)
    images = load_images(records, size=arch.image_size)
    data_fp = data_fingerprint(data_dir, "train")
    key = run_key(cfg, arch, data_fp, init_fp)
    ckdir = Path(checkpoint_dir or artifacts.checkpoint_dir(out_dir))
    ckdir.mkdir(parents=True, exist_ok=True)
    with _progress() as progress:
        vae_from = None if init_from is not None else train_vae(vae, images, cfg, ckdir / "vae", progress, key)
        raw = encode_dataset(vae, images)
        if init_from is None:
            vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
        scaling = float(vae.config.scaling_factor)
        if not math.isfinite(scaling):
            raise InvdiffError(f"pretrain: the VAE's latent scaling is {scaling} (its latents are constant or not "
                               "finite); check the images of --data")
        ema_unet, ema_text, unet_from = train_unet(unet, text_encoder, tokenizer, raw * scaling, texts, cfg,
                                                   ckdir / "unet", progress, key)
    info = {
        "recipe": asdict(cfg), "arch": arch.to_json(), "data_dir": str(data_dir),
        "init_from": None if init_from is None else {"model": str(init_from), "fingerprint": init_fp},
        "data_fingerprint": data_fp, "seed": cfg.seed,
        "parameters": {n: sum(p.numel() for p in m.parameters())
                       for n, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))},
        "scaling_factor": scaling, "resumed_from_step": {"vae": vae_from, "unet": unet_from},
        "training_seconds": round(time.time() - t0, 1), "versions": package_versions(),
        "weights_dtype": "float16" if fp16_weights else "float32",
    }
    dtype = torch.float16 if fp16_weights else torch.float32
    return save_model_dir(out_dir, tokenizer, ema_text, vae, ema_unet, info=info, dtype=dtype)
