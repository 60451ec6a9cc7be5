"""Per-sample denoising losses of the frozen base (epsilon target), as a timestep-resolved profile.

`paper`: one uniform t and one noise draw per sample, loss of the conditional prediction.
`invdiff-rt`: the *contrast* score loss(x_t | prompt) / loss(x_t | empty prompt), both on the same x_t (same noise,
same t, one UNet call at 2B as in classifier-free guidance). The noise draw's own difficulty cancels in the ratio; what
is left is how much the prompt's learned prior hurts this sample: a minority sample (say, a red digit whose prompt
the model has learned to draw green) is predicted worse with its prompt than without. A coarse t grid (one draw, on a
fixed random subset) picks the informative band by the smoothed skewness rule: a minority that the prompt's prior
gets wrong makes a right tail of the per-prompt log contrast, while an informative prompt that merely helps every sample
gives a left tail (on colored-digits the skewness rises with t from -1.5 at t=300 to +0.6 at t=975, in step with the
score's AUROC against the hidden colour: 0.26 -> 0.99). Then K draws with t ~ U[band] are averaged into the score,
as antithetic pairs: draws 2j and 2j+1 share t and use noise +eps and -eps. The loss at high t depends strongly on the
noise direction, and the pair cancels its odd part: on colored-digits one pair scored AUROC 0.978 against 0.946 for two
independent draws (and two pairs 0.994 against 0.991 for four), so a pair buys about what four independent draws did.
The ratio is already scale-free in t, so no per-t normalisation is needed. All noise and timesteps come from seeded
generators, so a profile does not depend on the batch size.

`--score classifier` (opt-in) compares the prompt with every prompt instead of the empty one: loss(x_t | own) *
sum_p 1 / loss(x_t | p), the inverse of the own prompt's posterior under the diffusion classifier that takes
1 / loss as a likelihood. The empty prompt's loss also depends on the image itself (on styled-digits it ranks thin
strokes as minority whichever stroke is rare), while the best other prompt explains a minority sample by its
attribute (a green 2 by the green odd digits). It costs P UNet calls per sample and draw instead of 2. Measured
(one antithetic pair in the band t = 950-999): colored-digits' colour minority at AUROC 1.000, precision 0.995,
recall 0.946 (contrast: 0.994, 0.993, 0.727), groups in 63 s instead of 19-24 s.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from ..errors import InvdiffError
from ..parallel import map_batches
from .objective import per_sample_loss

Advance = Callable[[int], None]
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class ProfileConfig:
    grid: tuple[int, ...] = (500, 700, 850, 925, 950, 975)  # coarse levels for the band choice
    grid_samples: int = 512  # the skewness curve is computed on a fixed random subset of this size
    band_halfwidth: int = 25
    draws: int = 2  # score evaluations per sample inside the band (one antithetic pair)
    antithetic: bool = True  # draws 2j, 2j+1 share t and use +eps / -eps (False: independent draws, for ablation)
    smooth: int = 3  # moving-average window over grid levels before the argmax
    score: str = "contrast"  # the band's score: "contrast" (vs the empty prompt) or "classifier" (vs every prompt)
    second_split: bool = True  # invdiff-rt: also record a candidate second split (splits.py)


@dataclass
class Profile:
    score: torch.Tensor  # [N], mean contrast ratio over the band's draws (invdiff-rt) or the single-draw loss (paper)
    band: tuple[int, int]
    info: dict = field(default_factory=dict)


def make_noise_scheduler(model):
    from diffusers import DDPMScheduler

    prediction_type(model.scheduler_config)  # refuse an unsupported target before any work
    return DDPMScheduler.from_config(model.scheduler_config)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def denoising_target(scheduler_config, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts, per the scheduler config's `prediction_type`: the noise (epsilon), the velocity
    sqrt(a_t) eps - sqrt(1 - a_t) x0 (v_prediction) or the clean latents (sample)."""
    kind = prediction_type(scheduler_config)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return latents
    if kind == "v_prediction":
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(dict(scheduler_config)).get_velocity(latents, noise, timesteps)


def target_from_eps(scheduler, x_t: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor,
                    shift: bool = False) -> torch.Tensor:
    """An eps-space training target (targets.py) in the model's prediction space: for a full prediction, the x0
    it implies on x_t gives the target; a shift is only defined for epsilon models."""
    kind = prediction_type(scheduler.config)
    if kind == "epsilon":
        return eps
    if shift:
        raise InvdiffError(f"--target posterior: needs an epsilon model, this one predicts {kind}; use the default "
                           "target")
    a = scheduler.alphas_cumprod.to(x_t.device)[timesteps.long()].reshape(-1, *([1] * (x_t.ndim - 1)))
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return denoising_target(scheduler.config, x0, eps, timesteps)


def prediction_type(scheduler_config) -> str:
    """The config's prediction_type (epsilon when absent), or a one-line error for an unsupported one."""
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise InvdiffError(f"scheduler/scheduler_config.json: prediction_type {kind!r} is not supported; "
                           f"use a model with one of {', '.join(PREDICTION_TYPES)}")
    return kind


def denoising_losses(unet, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor, prompt_ids: torch.Tensor,
                     timesteps: torch.Tensor, noise: torch.Tensor, batch_size: int,
                     advance: Advance | None = None, uncond_embedding: torch.Tensor | None = None) -> torch.Tensor:
    """||pred(x_t, t, c) - target||^2 per sample (mean over latent dims; the target follows the scheduler's
    prediction_type, eps for epsilon models); x_t from the training noise schedule.

    With `uncond_embedding` [1,L,D]: the contrast ratio loss(x_t | c) / loss(x_t | empty) instead, both predictions
    from one UNet call at 2B on the same x_t. Batches are independent, so on CPU they run concurrently
    (`map_batches`); the result does not depend on the batch size or the number of workers.
    """
    from ..runtime.traced import traced_eps

    device, predict = next(unet.parameters()).device, traced_eps(unet)  # traced on CPU

    @torch.inference_mode()
    def one_batch(s: int) -> torch.Tensor:
        x0, eps, t = latents[s:s + batch_size], noise[s:s + batch_size], timesteps[s:s + batch_size]
        x_t = scheduler.add_noise(x0, eps, t)
        emb = text_embeddings[prompt_ids[s:s + batch_size]]
        if uncond_embedding is not None:
            x_t, t, emb = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([emb, uncond_embedding.expand_as(emb)])
        pred = predict(x_t.to(device), t.to(device), emb.to(device)).cpu()
        n, target = x0.shape[0], denoising_target(scheduler.config, x0, eps, t)
        loss = per_sample_loss(pred[:n], target)
        if uncond_embedding is not None:
            loss = loss / per_sample_loss(pred[n:], target).clamp_min(1e-12)
        if advance:
            advance(n)
        return loss

    return torch.cat(map_batches(one_batch, range(0, latents.shape[0], batch_size), device))


SCORES = ("contrast", "classifier")


def prompt_losses(unet, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor, timesteps: torch.Tensor,
                  noise: torch.Tensor, batch_size: int, advance: Advance | None = None) -> torch.Tensor:
    """[N,P]: every sample's loss under every prompt, all on the same x_t."""
    n = latents.shape[0]
    return torch.stack([denoising_losses(unet, scheduler, latents, text_embeddings, torch.full((n,), p), timesteps,
                                         noise, batch_size, advance) for p in range(text_embeddings.shape[0])], 1)


def classifier_score(losses: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """1 / p(own prompt | x_t) of the diffusion classifier that takes 1 / loss(x_t | p) as prompt p's likelihood:
    loss(x_t | own) * sum_p 1 / loss(x_t | p) (>= 1; [N,P] losses -> [N])."""
    x = losses.double().clamp_min(1e-12)
    return x.gather(1, prompt_ids[:, None])[:, 0] * x.reciprocal().sum(1)


def _gen(seed: int, *keys: int) -> torch.Generator:
    value = seed
    for k in keys:
        value = (value * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def skewness(x: torch.Tensor) -> float:
    """Sample skewness E[(x - mean)^3] / sd^3 (0 for a constant)."""
    x = x.double()
    d = x - x.mean()
    var = d.pow(2).mean()
    return float(d.pow(3).mean() / var.pow(1.5)) if var > 0 else 0.0


def per_prompt_ratio(losses: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Loss divided by its prompt's median loss: a sample is unusual only relative to its own prompt."""
    out = torch.empty_like(losses)
    for p in prompt_ids.unique():
        sel = prompt_ids == p
        out[sel] = losses[sel] / losses[sel].median().clamp_min(1e-12)
    return out


def smoothed_argmax(values: list[float], window: int) -> int:
    v = torch.tensor(values, dtype=torch.float64)
    if window > 1:
        pad = window // 2
        padded = torch.cat([v[:1].repeat(pad), v, v[-1:].repeat(pad)])
        v = padded.unfold(0, window, 1).mean(dim=1)
    return int(v.argmax())


def paper_profile(unet, scheduler, inputs, seed: int, batch_size: int, advance: Advance | None = None) -> Profile:
    """The paper's loss collection: one t ~ U{0..999} and one noise draw per sample, epsilon target."""
    n = inputs.latents.shape[0]
    g = _gen(seed, 1)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=g)
    noise = torch.randn(inputs.latents.shape, generator=g)
    losses = denoising_losses(unet, scheduler, inputs.latents, inputs.text_embeddings, inputs.prompt_ids, t, noise,
                              batch_size, advance)
    return Profile(losses, (0, NUM_TRAIN_TIMESTEPS - 1), {"draws": 1})


def grid_curve(unet, scheduler, inputs, config: ProfileConfig, seed: int, batch_size: int,
               advance: Advance | None = None) -> tuple[list[float], list[float]]:
    """Per grid level: skewness of the per-prompt-normalised log contrast, and the mean contrast (one draw, fixed
    subset)."""
    n = inputs.latents.shape[0]
    subset = torch.randperm(n, generator=_gen(seed, 2))[:config.grid_samples].sort().values
    latents, pids = inputs.latents[subset], inputs.prompt_ids[subset]
    skew, means = [], []
    for level, t in enumerate(config.grid):
        noise = torch.randn(latents.shape, generator=_gen(seed, 3, level))
        ts = torch.full((latents.shape[0],), t, dtype=torch.long)
        contrast = denoising_losses(unet, scheduler, latents, inputs.text_embeddings, pids, ts, noise, batch_size,
                                    advance, uncond_embedding=inputs.uncond_embedding)
        skew.append(skewness(per_prompt_ratio(contrast, pids).log()))
        means.append(float(contrast.mean()))
    return skew, means


def _band_draw(seed: int, k: int, lo: int, hi: int, shape: torch.Size, antithetic: bool) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Timesteps ~ U[lo, hi] and noise of draw k; with `antithetic`, draw 2j+1 is draw 2j with the noise negated."""
    g = _gen(seed, 4, k // 2 if antithetic else k)
    t = torch.randint(lo, hi + 1, (shape[0],), generator=g)
    noise = torch.randn(shape, generator=g)
    return t, (-noise if antithetic and k % 2 else noise)


def band_profile(unet, scheduler, inputs, config: ProfileConfig, seed: int, batch_size: int,
                 advance: Advance | None = None) -> Profile:
    """invdiff-rt: choose the band on the grid, then average K draws of the band's score inside it."""
    skew, means = grid_curve(unet, scheduler, inputs, config, seed, batch_size, advance)
    t_star = config.grid[smoothed_argmax(skew, config.smooth)]
    lo = max(0, t_star - config.band_halfwidth)
    hi = min(NUM_TRAIN_TIMESTEPS - 1, t_star + config.band_halfwidth)
    score = band_score(unet, scheduler, inputs, (lo, hi), config, seed, batch_size, advance).float()
    info = {"score": config.score, "grid": list(config.grid), "skewness": skew, "grid_mean_contrast": means,
            "t_star": t_star, "draws": config.draws, "antithetic": config.antithetic,
            "grid_samples": min(config.grid_samples, inputs.latents.shape[0])}
    return Profile(score, (lo, hi), info)


@dataclass(frozen=True)
class ScoreInputs:
    """What a band score reads (`cache.BaseInputs` has the same fields)."""

    latents: torch.Tensor  # [N,C,H,W]
    prompt_ids: torch.Tensor  # [N]
    text_embeddings: torch.Tensor  # [P,L,D]
    uncond_embedding: torch.Tensor  # [1,L,D]


def band_score(unet, scheduler, inputs, band: tuple[int, int], config: ProfileConfig, seed: int, batch_size: int,
               advance: Advance | None = None) -> torch.Tensor:
    """float64 [N]: the band's score over `config.draws` draws of t ~ U[band] and noise (`mean_score`)."""
    draws = (_band_draw(seed, k, band[0], band[1], inputs.latents.shape, config.antithetic)
             for k in range(config.draws))
    return mean_score(unet, scheduler, inputs, draws, config.score, batch_size, advance)


def mean_score(unet, scheduler, inputs, draws: Iterable[tuple[torch.Tensor, torch.Tensor]], score: str,
               batch_size: int, advance: Advance | None = None) -> torch.Tensor:
    """float64 [N] over the (timesteps, noise) draws: the mean contrast ratio, or the classifier score of each
    prompt's mean loss (averaging an antithetic pair's losses before the score ranks colored-digits' colour minority
    at AUROC 0.9996, against 0.9994 for the mean of the two draws' scores)."""
    classifier = score == "classifier"
    total, n = 0, 0
    for t, noise in draws:
        if classifier:
            total = total + prompt_losses(unet, scheduler, inputs.latents, inputs.text_embeddings, t, noise,
                                          batch_size, advance).double()
        else:
            total = total + denoising_losses(unet, scheduler, inputs.latents, inputs.text_embeddings,
                                             inputs.prompt_ids, t, noise, batch_size, advance,
                                             uncond_embedding=inputs.uncond_embedding).double()
        n += 1
    mean = total / n
    return classifier_score(mean, inputs.prompt_ids) if classifier else mean


def forward_count(recipe: str, n: int, config: ProfileConfig, n_prompts: int = 1) -> int:
    """How many sample-forwards a profile takes (for the progress bar)."""
    if recipe == "paper":
        return n
    from .splits import CANDIDATE_LEVELS

    per_draw = n * (n_prompts if config.score == "classifier" else 1)
    band_again = config.draws if config.score == "classifier" else 0  # the candidate's contrast band score
    candidate = (2 * len(CANDIDATE_LEVELS) + band_again) * n if config.second_split else 0
    return len(config.grid) * min(config.grid_samples, n) + config.draws * per_draw + candidate


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A Rich progress bar; yields `advance(n, **fields)` (fields are shown after the bar). No-op when disabled."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance
