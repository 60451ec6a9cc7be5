"""The frozen base's loss profile: the contrast ratio on hand values, and the whole invdiff-rt profile on a model whose
prompt prior is known exactly (so a planted minority must come out on top, without labels)."""

from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler

from invdiff_rt.method import grouper, losses

SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class PriorUNet(torch.nn.Module):
    """The ideal noise predictor for a model that believes x0 == mu(c), with mu(c) = the mean of the embedding:
    eps_hat = (x_t - sqrt(ab_t) mu) / sqrt(1 - ab_t)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # losses read the device off the parameters

    def forward(self, x_t, t, encoder_hidden_states):
        ab = SCHEDULER.alphas_cumprod[t.long()].to(x_t.dtype)[:, None, None, None]
        mu = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        return SimpleNamespace(sample=(x_t - ab.sqrt() * mu) / (1 - ab).sqrt())


def test_contrast_ratio_hand_values():
    unet = PriorUNet()
    x0 = torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1).expand(2, 4, 2, 2).contiguous()
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 900])
    cond = torch.full((1, 3, 5), -1.0)  # the prompt's prior: x0 = -1 (the majority)
    uncond = torch.zeros(1, 3, 5)  # the empty prompt's prior: x0 = 0
    ratio = losses.denoising_losses(unet, SCHEDULER, x0, cond, torch.tensor([0, 0]), t, noise, 8,
                                    uncond_embedding=uncond)
    # eps_hat - eps = sqrt(ab/(1-ab)) (x0 - mu): majority -> 0 / 1, minority -> 2^2 / 1^2
    torch.testing.assert_close(ratio, torch.tensor([0.0, 4.0]), atol=1e-5, rtol=1e-5)
    same = losses.denoising_losses(unet, SCHEDULER, x0, uncond, torch.tensor([0, 0]), t, noise, 1,
                                   uncond_embedding=uncond)
    torch.testing.assert_close(same, torch.ones(2))
    plain = losses.denoising_losses(unet, SCHEDULER, x0, cond, torch.tensor([0, 0]), t, noise, 8)
    ab = SCHEDULER.alphas_cumprod[900]
    torch.testing.assert_close(plain, torch.tensor([0.0, float(4 * ab / (1 - ab))]), atol=1e-6, rtol=1e-5)


def _planted_inputs(n=240, prompts=2, minority_per_prompt=12, seed=0):
    """Prompt p believes x0 = (-1)^p; 12 samples per prompt are the opposite sign (the minority)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.arange(n) % prompts
    sign = torch.where(prompt_ids == 0, -1.0, 1.0)  # the majority of each prompt matches its prior
    minority = torch.zeros(n, dtype=torch.bool)
    for p in range(prompts):
        minority[(prompt_ids == p).nonzero().flatten()[:minority_per_prompt]] = True
    x0 = torch.where(minority, -sign, sign)[:, None, None, None] + 0.3 * torch.randn(n, 4, 2, 2, generator=g)
    text = torch.stack([torch.full((3, 5), -1.0), torch.full((3, 5), 1.0)])[:prompts]
    inputs = SimpleNamespace(latents=x0, prompt_ids=prompt_ids, text_embeddings=text,
                             uncond_embedding=torch.zeros(1, 3, 5))
    return inputs, minority


def test_profile_isolates_a_planted_minority_label_free_and_is_batch_independent():
    inputs, minority = _planted_inputs()
    config = losses.ProfileConfig(grid=(300, 700, 950), grid_samples=100, draws=2, smooth=1)
    a = losses.band_profile(PriorUNet(), SCHEDULER, inputs, config, seed=0, batch_size=7)
    b = losses.band_profile(PriorUNet(), SCHEDULER, inputs, config, seed=0, batch_size=64)
    torch.testing.assert_close(a.score, b.score)
    assert a.band == b.band and a.band[0] <= a.info["t_star"] <= a.band[1]
    g = grouper.group_robust(a.score, inputs.prompt_ids)
    d = grouper.group_diagnostics(g.score, g.inferred, g.weights, g.sampling, minority)
    assert d["auroc"] > 0.99 and d["precision"] == 1.0 and d["recall"] > 0.9
    assert d["minority_effective_weight"] >= 0.45


def test_classifier_score_hand_values():
    # loss(own) * sum_p 1 / loss(p): 1 * (1 + 1/2) and 1 * (1/4 + 1)
    torch.testing.assert_close(losses.classifier_score(torch.tensor([[1.0, 2.0], [4.0, 1.0]]), torch.tensor([0, 1])),
                               torch.tensor([1.5, 1.25], dtype=torch.float64))


def test_classifier_band_score_compares_every_prompt_by_hand():
    # priors x0 = -1, 0, +1; every sample is x0 = 0.5, so loss(p) = c (0.5 - mu_p)^2 for one c at any t and noise:
    # own prior -1: 2.25 (1/2.25 + 1/0.25 + 1/0.25) = 19; own prior 0 or +1: 0.25 (1/2.25 + 8) = 19/9
    text = torch.stack([torch.full((3, 5), v) for v in (-1.0, 0.0, 1.0)])
    inputs = losses.ScoreInputs(torch.full((6, 4, 2, 2), 0.5), torch.tensor([0, 1, 2, 0, 1, 2]), text,
                                torch.zeros(1, 3, 5))
    config = losses.ProfileConfig(score="classifier")
    score = losses.band_score(PriorUNet(), SCHEDULER, inputs, (900, 950), config, seed=0, batch_size=4)
    torch.testing.assert_close(score, torch.tensor([19, 19 / 9, 19 / 9] * 2, dtype=torch.float64), rtol=1e-4,
                               atol=0)
    # + the candidate: 4 levels x 1 pair, and the band's contrast drawn again (the band's score is the classifier's)
    assert losses.forward_count("invdiff-rt", 6, config, n_prompts=3) == 6 * 6 + 2 * 6 * 3 + (2 * 4 + 2) * 6
    assert losses.forward_count("invdiff-rt", 6, losses.ProfileConfig()) == 6 * 6 + 2 * 6 + 2 * 4 * 6  # band reused
    no_candidate = losses.ProfileConfig(score="classifier", second_split=False)
    assert losses.forward_count("invdiff-rt", 6, no_candidate, n_prompts=3) == 6 * 6 + 2 * 6 * 3


def test_classifier_profile_isolates_a_planted_minority():
    inputs, minority = _planted_inputs()
    config = losses.ProfileConfig(grid=(300, 700, 950), grid_samples=100, draws=2, smooth=1, score="classifier")
    profile = losses.band_profile(PriorUNet(), SCHEDULER, inputs, config, seed=0, batch_size=16)
    g = grouper.group_robust(profile.score, inputs.prompt_ids)
    d = grouper.group_diagnostics(g.score, g.inferred, g.weights, g.sampling, minority)
    assert profile.info["score"] == "classifier"
    assert d["auroc"] > 0.99 and d["precision"] >= 0.95 and d["recall"] > 0.9


def test_antithetic_draws_pair_noise_and_share_timesteps():
    inputs, _ = _planted_inputs(n=40)
    shape = inputs.latents.shape
    t0, e0 = losses._band_draw(3, 0, 925, 975, shape, antithetic=True)
    t1, e1 = losses._band_draw(3, 1, 925, 975, shape, antithetic=True)
    t2, e2 = losses._band_draw(3, 2, 925, 975, shape, antithetic=True)
    assert torch.equal(t0, t1) and torch.equal(e1, -e0)
    assert not torch.equal(t2, t0) and not torch.allclose(e2.abs(), e0.abs())
    assert int(t0.min()) >= 925 and int(t0.max()) <= 975
    # independent draws: draw 0 is the same as the antithetic draw 0, draw 1 is a fresh one
    _, ei = losses._band_draw(3, 1, 925, 975, shape, antithetic=False)
    assert not torch.equal(ei, -e0)
    # the profile is the mean over the pair: recompute it by hand from the two draws
    config = losses.ProfileConfig(grid=(950,), grid_samples=40, draws=2, smooth=1)
    profile = losses.band_profile(PriorUNet(), SCHEDULER, inputs, config, seed=3, batch_size=16)
    lo, hi = profile.band
    by_hand = sum(losses.denoising_losses(PriorUNet(), SCHEDULER, inputs.latents, inputs.text_embeddings,
                                          inputs.prompt_ids, *losses._band_draw(3, k, lo, hi, shape, True), 16,
                                          uncond_embedding=inputs.uncond_embedding) for k in range(2)) / 2
    torch.testing.assert_close(profile.score, by_hand)
    assert profile.info["antithetic"] is True


def test_concurrent_batches_match_sequential_and_restore_threads():
    inputs, _ = _planted_inputs(n=100)
    t = torch.full((100,), 950)
    noise = torch.randn(inputs.latents.shape, generator=torch.Generator().manual_seed(1))
    args = (PriorUNet(), SCHEDULER, inputs.latents, inputs.text_embeddings, inputs.prompt_ids, t, noise, 9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = losses.denoising_losses(*args, uncond_embedding=inputs.uncond_embedding)
        torch.set_num_threads(3)
        seen = []
        concurrent = losses.denoising_losses(*args, advance=seen.append, uncond_embedding=inputs.uncond_embedding)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert torch.equal(sequential, concurrent) and sorted(seen) == [1] + [9] * 11
