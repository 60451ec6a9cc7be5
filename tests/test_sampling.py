import numpy as np
import pytest
import torch

from invdiff_rt.errors import InvdiffError
from invdiff_rt.runtime.fused import FusedDenoiser
from invdiff_rt.runtime.sampling import initial_latents, item_seed, make_scheduler, sample_images


def test_initial_latents_depend_only_on_seed_prompt_index():
    a = initial_latents(0, "a photo of the digit 3", 5, (4, 8, 8))
    assert torch.equal(a, initial_latents(0, "a photo of the digit 3", 5, (4, 8, 8)))
    assert not torch.equal(a, initial_latents(0, "a photo of the digit 3", 6, (4, 8, 8)))
    assert not torch.equal(a, initial_latents(1, "a photo of the digit 3", 5, (4, 8, 8)))
    assert item_seed(0, "p", 1) != item_seed(0, "p", 2) and 0 <= item_seed(0, "p", 1) < 2**63


@pytest.mark.parametrize("name", ["ddim", "dpm", "euler"])
def test_schedulers(tiny_model, name):
    s = make_scheduler(tiny_model.scheduler_config, name)
    s.set_timesteps(5)
    assert len(s.timesteps) == 5
    if name == "ddim":
        assert s.config.clip_sample is False


def test_unknown_scheduler_is_one_line_error(tiny_model):
    with pytest.raises(InvdiffError, match="--scheduler"):
        make_scheduler(tiny_model.scheduler_config, "pndm")


def test_fused_cfg_matches_manual_combine(tiny_model):
    torch.manual_seed(0)
    unet = tiny_model.unet
    fused = FusedDenoiser(unet)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    emb = tiny_model.encode_text(["a photo of the digit 1"] * 3 + [""] * 3)
    with torch.no_grad():
        out = fused(x, t, emb, torch.tensor(4.0), torch.tensor(1.0))
        c = unet(x, t, emb[:3]).sample
        u = unet(x, t, emb[3:]).sample
    torch.testing.assert_close(out, u + 4.0 * (c - u), atol=1e-5, rtol=1e-5)


def test_sample_images_independent_of_batch_composition(tiny_model):
    prompts = ["a photo of the digit 1", "a photo of the digit 2", "a photo of the digit 1"]
    idx = [0, 0, 1]
    together = sample_images(tiny_model, prompts, idx, seed=3, steps=3, batch_size=3)
    alone = np.concatenate([sample_images(tiny_model, [p], [i], seed=3, steps=3, batch_size=1)
                            for p, i in zip(prompts, idx)])
    assert together.shape == (3, 32, 32, 3) and together.dtype == np.uint8
    # CPU GEMMs may differ in the last bit between batch sizes: at most 1/255 anywhere
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1
    again = sample_images(tiny_model, prompts, idx, seed=3, steps=3, batch_size=3)
    assert np.array_equal(together, again)


class _WeightRecorder:
    """A runtime whose step returns zeros and records the adapter weight it was given."""

    name, latent_shape, cfg = "recorder", (4, 2, 2), True

    def __init__(self, scheduler_config, from_t):
        self.scheduler_config, self.adapter_from_t, self.weights = scheduler_config, from_t, []

    def denoise_step(self, sample, timestep, text_embeddings, guidance_scale, adapter_weight):
        self.weights.append((int(timestep[0]), adapter_weight))
        return torch.zeros_like(sample)


@pytest.mark.parametrize("from_t, expected", [(None, [1.5] * 5), (0, [1.5] * 5), (500, [1.5, 1.5, 1.5, 0.0, 0.0]),
                                              (2000, [0.0] * 5)])
def test_the_adapter_weight_is_zero_below_the_adapters_from_t(tiny_model, from_t, expected):
    from invdiff_rt.runtime.sampling import denoise

    runtime = _WeightRecorder(tiny_model.scheduler_config, from_t)
    denoise(runtime, make_scheduler(runtime.scheduler_config), torch.zeros(1, 4, 2, 2), torch.zeros(2, 3, 8), 3.0,
            1.5, 5)
    assert [t for t, _ in runtime.weights] == [999, 799, 599, 399, 199]  # DDIM, 5 of 1000 steps, trailing
    assert [w for _, w in runtime.weights] == expected


def test_check_scheduler_config_refuses_what_the_samplers_cannot_step():
    """The check `load_model` and export manifests run (`invdiff generate` on a hand-edited config)."""
    from invdiff_rt.runtime.sampling import check_scheduler_config

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "prediction_type": "v_prediction"}
    check_scheduler_config(config)
    for key, value, message in (("num_train_timesteps", "x", "not a scheduler config diffusers builds"),
                                ("beta_schedule", "cosine-ish", "not a scheduler config diffusers builds"),
                                ("prediction_type", "sample2", "prediction_type 'sample2' is not one of")):
        with pytest.raises(ValueError, match=message):
            check_scheduler_config({**config, key: value})
