"""What the adapter is trained on: where in t its training samples come from, and what it regresses.

Timesteps (`t_sampling`):
* `uniform`: t ~ U{0..999} (the paper's and the first recipe's choice).
* `snr`: p(t) proportional to sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t). A spurious attribute that is a global,
  low-frequency feature (a colour, a background) is decided at high t, where an error of `d` in the clean latent is
  an error of only `d * alpha_t / sigma_t` in epsilon: under uniform t the shift the adapter must learn there carries
  almost no gradient. This draws those t more often (the adapter is conditioned on t, so the optimum at each t is
  unchanged; only how often each t is seen changes).

Targets (`target`):
* `noise`: the plain epsilon loss ||eps_base + delta - eps||^2 on samples drawn from the groups' sampler (its optimum is
  delta = E_balanced[eps | x_t] - eps_base, learned through the full variance of eps).
* `posterior`: delta regresses the shift of the empirical posterior mean, Rao-Blackwellised:
      delta* = -(alpha_t / sigma_t) * (E_s[x0 | x_t] - E_1[x0 | x_t])
  where E_s weighs the prompt's training latents by the groups' sampling weights s and E_1 weighs them uniformly (the
  biased data the base learned), both with the Gaussian likelihood N(x_t; alpha_t x0, sigma_t^2). An empty (dropped)
  caption uses every training latent. The target has no noise term, so a batch carries the shift itself; where the
  posterior is concentrated on one latent (low and middle t) the target is zero, so the adapter leaves the base alone.
* `rb`: the noise target with the noise Rao-Blackwellised out: eps_base + delta regresses the weighted empirical
  denoiser eps_s(x_t) = (x_t - alpha_t E_s[x0 | x_t]) / sigma_t. Under the sampler's (empirical) distribution
  E[eps | x_t] = eps_s(x_t), so the optimum is the `noise` target's; where the posterior is concentrated (low t)
  eps_s(x_t) is the drawn noise itself (the `noise` target), where it is spread (high t) the noise term is gone.

Temperature (`Posterior.temperature`, the second split's fine-tune: `splits.FINETUNE_TEMPERATURE`): the reweighting's
shift E_s - E_q is taken from posteriors whose log-likelihood is divided by T > 1, and added to the data's exact
denoiser. At t = 650-850, where a stroke style is decided, the exact posterior rests on the few training latents next
to x_t, so its shift is specific to each sample (a 44k-parameter adapter fits a third of it) and moves the digits
whose minority is rarest least; the flatter posterior spreads the reweighting over more of the prompt's latents
(bench/results/debiasing.md, *A tempered shift for the second split*).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

T_SAMPLING = ("uniform", "snr")
TARGETS = ("noise", "posterior", "rb")
POSTERIOR_TARGETS = ("posterior", "rb")  # the targets computed from the empirical posterior (`Posterior`)


def timestep_probs(alphas_cumprod: torch.Tensor, mode: str, start: int = 0) -> torch.Tensor:
    """[T] sampling probabilities of the training timesteps (none below `start`: where the adapter is off)."""
    abar = alphas_cumprod.double()
    if mode == "uniform":
        p = torch.ones_like(abar)
    elif mode == "snr":
        p = ((1 - abar) / abar).sqrt()
    else:
        raise ValueError(f"unknown t sampling {mode!r}")
    p[:start] = 0
    return (p / p.sum()).float()


def draw_timesteps(probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs, n, replacement=True, generator=generator)


@dataclass(frozen=True)
class Posterior:
    """The empirical posterior over the training latents under a sampler's weights: per prompt id, that prompt's
    latents (flat, float64), their squared norms, log sampling weights and log prior weights; id -1 (a dropped
    caption) holds every latent. Built once per run: rebuilding these every batch was a fifth of an adapter training
    step.

    `prior` (optional, [N]): what the base's sampler draws, as a weight per training row relative to the data (the
    groups at the shares the guided base actually draws them at, e.g. 0.98 where the data has 0.95): the shift is then
    taken from that distribution to the sampler's weights, not from the data's (None: the data's, uniform). The
    dropped-caption table (-1) takes the same row weights: a choice, not a derivation (the guided output mixes both
    branches, and the unguided empty prompt alone draws about the data's shares); the data's weights there measured
    the same (colored-digits, bench/results/debiasing.md)."""

    tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    has_prior: bool = False
    temperature: float = 1.0  # the reweighting's shift from posteriors at logits / T (`shift`, `eps`); 1: exact

    @classmethod
    def build(cls, latents: torch.Tensor, prompt_ids: torch.Tensor, sampling: torch.Tensor,
              prior: torch.Tensor | None = None, temperature: float = 1.0) -> "Posterior":
        log_s = sampling.clamp_min(1e-12).log()
        log_q = torch.zeros_like(log_s) if prior is None else prior.clamp_min(1e-12).log()
        log_w = torch.stack([log_s, log_q, torch.zeros_like(log_s)])
        masks = {-1: torch.ones_like(prompt_ids, dtype=torch.bool)}
        masks.update({int(p): prompt_ids == p for p in prompt_ids.unique()})
        return cls({p: _table(latents[m], log_w[:, m]) for p, m in masks.items()}, prior is not None, temperature)

    def shift(self, x_t: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """delta* [B,C,h,w] for a batch; `prompt` [B] holds each row's prompt id, or -1 for a dropped caption."""
        alpha, sigma = _alpha_sigma(alphas_cumprod, t)
        temp = self.temperature
        weighted, prior = self._means(x_t, alpha, sigma, prompt, (SAMPLER, PRIOR), (temp, temp))
        shift = -(alpha / sigma)[:, None] * (weighted - prior)
        return shift.reshape(x_t.shape).float()

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor,
            alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """eps_s(x_t) [B,C,h,w]: the empirical denoiser of the sampler-weighted training latents (`rb` target); with
        a prior, plus the prior's shift from the data, eps_1 - eps_q (the base predicts eps_1, its sampler draws q)."""
        alpha, sigma = _alpha_sigma(alphas_cumprod, t)
        if self.temperature != 1.0:  # the data's exact denoiser plus the tempered shift
            temp = self.temperature
            plain, weighted, prior = self._means(x_t, alpha, sigma, prompt, (PLAIN, SAMPLER, PRIOR), (1.0, temp, temp))
            mean = plain + weighted - prior
        elif self.has_prior:
            weighted, prior, plain = self._means(x_t, alpha, sigma, prompt, (SAMPLER, PRIOR, PLAIN))
            mean = weighted - prior + plain
        else:
            mean = self._means(x_t, alpha, sigma, prompt, (SAMPLER,))[0]
        eps = (x_t.flatten(1).double() - alpha[:, None] * mean) / sigma[:, None]
        return eps.reshape(x_t.shape).float()

    def _means(self, x_t, alpha, sigma, prompt, weightings: tuple[int, ...],
               temperatures: tuple[float, ...] | None = None) -> torch.Tensor:
        """[len(weightings), B, D]: E[x0 | x_t] of each row over its own prompt's latents in float64, under each
        weighting of the latents (`SAMPLER`: the sampler's, `PRIOR`: the prior's, `PLAIN`: uniform), each with the
        likelihood's log at 1 / its temperature (a flatter posterior above 1; None: all 1). The likelihood is
        computed once per prompt."""
        temperatures = temperatures or (1.0,) * len(weightings)
        means = torch.empty(len(weightings), x_t.shape[0], x_t[0].numel(), dtype=torch.float64)
        for p in prompt.unique().tolist():
            rows = prompt == p
            flat, sq_norms, log_w = self.tables[p]
            logits = _logits(x_t[rows], alpha[rows], sigma[rows], flat, sq_norms)
            for i, (k, temperature) in enumerate(zip(weightings, temperatures)):
                means[i, rows] = torch.softmax(logits / temperature + log_w[k], dim=1) @ flat
        return means


SAMPLER, PRIOR, PLAIN = range(3)  # the rows of a Posterior table's log weights


def _table(latents: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = latents.flatten(1).double()
    return flat, flat.pow(2).sum(1), log_w.double()


def _alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    abar = alphas_cumprod[t].double()
    return abar.sqrt(), (1 - abar).sqrt()


def _logits(x_t, alpha, sigma, flat, sq_norms) -> torch.Tensor:
    """log N(x_t; alpha x0, sigma^2) up to a per-row constant: [B, n] over the latents x0 = `flat`."""
    x = x_t.flatten(1).double()
    a, s2 = alpha.double()[:, None], sigma.double().pow(2)[:, None]
    dist = (x.pow(2).sum(1, keepdim=True) - 2 * a * (x @ flat.T) + a.pow(2) * sq_norms[None])
    return -dist / (2 * s2)


# Where the adapter acts (`from_t`, recorded in adapter.json; `sampling.step_weight` sets the weight to 0 below it).
# colored-digits, inferred groups, seed-0 adapter at its calibrated w = 1.621, N = 128: active at every step, bias
# 0.094, fidelity 0.902, FID 44.5; only at t >= 800 (the first t at 3/4 of the largest shift), bias 0.089, fidelity
# 0.918, FID 33.3; t >= 800 with w = 1 below it: FID 39.3 (the README in git history). Below it the data's
# posterior under the groups' sampler is the base's own: the shape forms there, and the adapter only adds its error.
FROM_T_FRACTION = 0.75
FROM_T_GRID_STEP = 50


def shift_profile(noise_scheduler, latents: torch.Tensor, prompt_ids: torch.Tensor, sampling: torch.Tensor,
                  grid: list[int], n: int = 256, seed: int = 1, prior: torch.Tensor | None = None) -> list[float]:
    """rms of `Posterior.shift` at each t of `grid`, on `n` training samples drawn from the groups' sampler."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(sampling, n, replacement=True, generator=gen)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=gen)
    posterior = Posterior.build(latents, prompt_ids, sampling, prior)
    rms = []
    for t in grid:
        tt = torch.full((n,), t)
        x_t = noise_scheduler.add_noise(x0, noise, tt)
        shift = posterior.shift(x_t, tt, prompt_ids[idx], noise_scheduler.alphas_cumprod)
        rms.append(float(shift.double().pow(2).mean().sqrt()))
    return rms


def active_from_t(noise_scheduler, latents: torch.Tensor, prompt_ids: torch.Tensor, sampling: torch.Tensor,
                  fraction: float = FROM_T_FRACTION, prior: torch.Tensor | None = None) -> tuple[int, dict[str, float]]:
    """(from_t, profile): the first t of a grid where the groups' reweighting moves the posterior by at least
    `fraction` of its largest move (where the spurious attribute is decided; 0 when it moves nowhere), and the
    rms profile that decided it. Label-free: it uses only the training latents and the sampler's weights."""
    grid = list(range(0, noise_scheduler.config.num_train_timesteps, FROM_T_GRID_STEP))
    rms = shift_profile(noise_scheduler, latents, prompt_ids, sampling, grid, prior=prior)
    top = max(rms)
    from_t = next((t for t, r in zip(grid, rms) if r >= fraction * top), 0) if top > 1e-6 else 0  # 0: no move
    return from_t, {str(t): round(r, 5) for t, r in zip(grid, rms)}
