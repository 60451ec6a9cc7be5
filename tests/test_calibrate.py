"""Training targets (targets.py) and the label-free weight rule (calibrate.py): pure parts with hand-computed values,
the whole rule on a tiny model with a golden weight, and `generate` picking up the recorded weight."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from invdiff_rt.errors import InvdiffError
from invdiff_rt.method import calibrate as cal
from invdiff_rt.method.targets import Posterior, timestep_probs

ABAR = torch.linspace(0.999, 0.001, 1000)


# ---------------------------------------------------------------- targets


def test_snr_sampling_prefers_high_t_and_uniform_is_flat():
    p = timestep_probs(ABAR, "snr")
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-5) and p[999] > 100 * p[10]
    expected = math.sqrt(0.999 / 0.001) / math.sqrt(0.001 / 0.999)  # sigma/alpha ratio of the two ends
    assert math.isclose(float(p[999] / p[0]), expected, rel_tol=1e-3)
    assert torch.allclose(timestep_probs(ABAR, "uniform"), torch.full((1000,), 1e-3))
    active = timestep_probs(ABAR, "snr", start=800)  # --active-only: nothing below from_t, same shape above it
    assert float(active[:800].sum()) == 0.0 and math.isclose(float(active.sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(float(active[999] / active[800]), float(p[999] / p[800]), rel_tol=1e-4)


def test_posterior_shift_two_latents_by_hand():
    latents = torch.tensor([[1.0], [-1.0]]).reshape(2, 1, 1, 1)
    ids = torch.zeros(2, dtype=torch.long)
    sampling = torch.tensor([1.0, 3.0])  # the second latent up-weighted 3:1
    t = torch.tensor([999])
    x_t = torch.zeros(1, 1, 1, 1)  # equidistant: the plain posterior is 50/50, the weighted 25/75
    a = ABAR[999].sqrt()
    got = Posterior.build(latents, ids, sampling).shift(x_t, t, torch.tensor([0]), ABAR)
    want = -(a / (1 - ABAR[999]).sqrt()) * ((0.25 - 0.75) - 0.0)
    assert torch.allclose(got.flatten(), want.reshape(1), rtol=1e-5)
    assert torch.equal(Posterior.build(latents, ids, torch.ones(2)).shift(x_t, t, torch.tensor([0]), ABAR),
                       torch.zeros(1, 1, 1, 1))  # uniform weights: no shift


def test_posterior_with_the_samplers_prior_by_hand():
    """With a prior q (what the guided base draws), the shift runs from q to the sampler's weights s and the rb target
    adds the prior's own move from the data: E_s - E_q + E_1 in place of E_s (a dropped caption: every latent)."""
    latents = torch.tensor([[1.0], [-1.0]]).reshape(2, 1, 1, 1)
    ids, t, x = torch.zeros(2, dtype=torch.long), torch.tensor([500, 500]), 0.3
    x_t, rows = torch.full((2, 1, 1, 1), x), torch.tensor([0, -1])
    a, s = float(ABAR[500].sqrt()), float((1 - ABAR[500]).sqrt())
    sampling, prior = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])

    def mean(w_plus: float, w_minus: float) -> float:  # E_w[x0 | x_t] over the latents +1 and -1, by hand
        plus, minus = w_plus * math.exp(-(x - a) ** 2 / (2 * s * s)), w_minus * math.exp(-(x + a) ** 2 / (2 * s * s))
        return (plus - minus) / (plus + minus)

    e_s, e_q, e_1 = mean(1, 3), mean(3, 1), mean(1, 1)
    post = Posterior.build(latents, ids, sampling, prior)
    want_shift, want_eps = -(a / s) * (e_s - e_q), (x - a * (e_s - e_q + e_1)) / s
    assert torch.allclose(post.shift(x_t, t, rows, ABAR).flatten(), torch.full((2,), want_shift), rtol=1e-5)
    assert torch.allclose(post.eps(x_t, t, rows, ABAR).flatten(), torch.full((2,), want_eps), rtol=1e-5)
    assert abs(e_1) > 0.1  # x_t off centre: a sign slip on E_1 would show
    plain = Posterior.build(latents, ids, sampling)  # a uniform prior is no prior: the same values
    uniform = Posterior.build(latents, ids, sampling, torch.ones(2))
    assert torch.equal(plain.shift(x_t, t, rows, ABAR), uniform.shift(x_t, t, rows, ABAR))
    assert torch.allclose(plain.eps(x_t, t, rows, ABAR), uniform.eps(x_t, t, rows, ABAR), atol=1e-6)


def test_tempered_shift_by_hand():
    """At temperature T the reweighting's shift comes from posteriors at logits / T and is added to the data's exact
    denoiser; T = 1 is the exact target to the bit."""
    latents = torch.tensor([[1.0], [-1.0]]).reshape(2, 1, 1, 1)
    ids, t, x = torch.zeros(2, dtype=torch.long), torch.tensor([500, 500]), 0.3
    x_t, rows = torch.full((2, 1, 1, 1), x), torch.tensor([0, -1])
    a, s = float(ABAR[500].sqrt()), float((1 - ABAR[500]).sqrt())
    sampling, prior = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])

    def mean(w_plus: float, w_minus: float, temp: float = 1.0) -> float:
        plus = w_plus * math.exp(-(x - a) ** 2 / (2 * s * s * temp))
        minus = w_minus * math.exp(-(x + a) ** 2 / (2 * s * s * temp))
        return (plus - minus) / (plus + minus)

    for q, (wq_plus, wq_minus) in ((None, (1, 1)), (prior, (3, 1))):
        post = Posterior.build(latents, ids, sampling, q, temperature=3.0)
        shift = mean(1, 3, 3.0) - mean(wq_plus, wq_minus, 3.0)
        assert abs(shift) > abs(mean(1, 3) - mean(wq_plus, wq_minus)) + 1e-3  # off centre: flatter moves more
        want_eps = (x - a * (mean(1, 1) + shift)) / s
        assert torch.allclose(post.shift(x_t, t, rows, ABAR).flatten(), torch.full((2,), -(a / s) * shift), rtol=1e-5)
        assert torch.allclose(post.eps(x_t, t, rows, ABAR).flatten(), torch.full((2,), want_eps), rtol=1e-5)
        exact = Posterior.build(latents, ids, sampling, q)
        for fn in ("shift", "eps"):
            at_one = Posterior.build(latents, ids, sampling, q, temperature=1.0)
            assert torch.equal(getattr(at_one, fn)(x_t, t, rows, ABAR), getattr(exact, fn)(x_t, t, rows, ABAR))


def test_rb_target_is_the_drawn_noise_at_low_t_and_masks_other_prompts():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 2, 2, generator=g)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    noise = torch.randn(2, 4, 2, 2, generator=g)
    t = torch.tensor([0, 0])
    a, s = ABAR[0].sqrt(), (1 - ABAR[0]).sqrt()
    x_t = a * latents[[1, 4]] + s * noise
    got = Posterior.build(latents, ids, torch.rand(6, generator=g) + 0.5).eps(x_t, t, torch.tensor([0, 1]), ABAR)
    assert torch.allclose(got, noise, atol=1e-4)
    # a row of prompt 0 never sees prompt 1's latents: shifting those changes nothing
    moved = latents.clone()
    moved[3:] += 5
    x_hi = torch.randn(1, 4, 2, 2, generator=g)
    args = (torch.tensor([999]), torch.tensor([0]))
    assert torch.equal(Posterior.build(latents, ids, torch.arange(1.0, 7.0)).shift(x_hi, *args, ABAR),
                       Posterior.build(moved, ids, torch.arange(1.0, 7.0)).shift(x_hi, *args, ABAR))


# ---------------------------------------------------------------- the weight search (pure)


def test_target_rate_weighs_rows_as_the_groups_sampler_does():
    flag_u = torch.tensor([True, False, False, False, True, False])
    pid_u = torch.tensor([0, 0, 0, 1, 1, 1])
    inferred_u = torch.tensor([True, False, False, False, False, False])
    flag_i = torch.tensor([True, False, True])
    pid_i = torch.tensor([0, 0, 1])
    # the JTT sampler, inferred rows half of each prompt's mass: prompt 0: 0.5 * 1/2 + 0.5 * 0/2 = 0.25; prompt 1:
    # 0.5 * 1 + 0.5 * 1/3
    want = (0.25 + 0.5 + 0.5 / 3) / 2
    jtt = cal.target_rate(flag_u, pid_u, inferred_u, flag_i, pid_i, torch.ones(3), torch.tensor([2.0, 1.0]), 2)
    assert math.isclose(jtt, want, rel_tol=1e-9)
    # unequal weights inside the inferred set (the raked sampler of two splits): prompt 0: (3 * 1 + 1 * 0 + 2 * 0) / 6
    raked = cal.target_rate(flag_u, pid_u, inferred_u, flag_i, pid_i, torch.tensor([3.0, 1.0, 1.0]),
                            torch.tensor([2.0, 1.0]), 2)
    assert math.isclose(raked, (0.5 + 0.5 + 0.5 / 3) / 2, rel_tol=1e-9)


def test_search_brackets_and_interpolates_a_monotone_rate():
    calls = []

    def rate(w):
        calls.append(w)
        return 0.1 + 0.2 * w  # r* = 0.5 at w = 2

    w, tried = cal.search_weight(rate, 0.5, cal.CalibrateConfig(max_evals=4))
    assert calls[:2] == [1.0, 2.0] and math.isclose(w, 2.0, abs_tol=1e-6)
    w, tried = cal.search_weight(lambda w: 0.2 * w, 0.05, cal.CalibrateConfig(max_evals=4))
    assert tried[0][0] == 0.0 and math.isclose(w, 0.25, abs_tol=1e-6)  # below w = 1: bracket with 0
    w, _ = cal.search_weight(lambda w: 0.01 * w, 0.5, cal.CalibrateConfig(max_evals=4, max_weight=4.0))
    assert w == 4.0  # out of reach: the largest weight tried


def test_estimate_reads_a_curved_rate_off_a_quadratic_not_the_chord():
    """r(w) = 1 - exp(-w) (concave, like colored-digits'), r* = 0.6: the root is ln(2.5) = 0.9163; the chord between
    the bracketing weights 0.5 and 1.5 says 1.0387, the quadratic through 0.5, 1.5 and 2 says 0.9493 (golden)."""
    tried = [(w, 1 - math.exp(-w)) for w in (0.5, 1.5, 2.0)]
    assert math.isclose(cal.interpolate(tried, 0.6), 1.03868, abs_tol=1e-4)
    assert math.isclose(cal.estimate(tried, 0.6), 0.94927, abs_tol=1e-4)
    assert abs(cal.estimate(tried, 0.6) - math.log(2.5)) < abs(cal.interpolate(tried, 0.6) - math.log(2.5))
    assert cal.estimate(tried[:2], 0.6) == cal.interpolate(tried[:2], 0.6)  # two points: the chord
    assert cal.estimate(tried, 0.95) == 2.0  # not bracketed: the nearest end, as interpolate


def test_detector_reuses_the_groups_band_score_classifier_or_contrast():
    from tests.test_losses import SCHEDULER, PriorUNet

    # priors x0 = -1, 0, +1 and every sample x0 = 0.5: the classifier score is 19 (own prior -1) and 19/9 (the others,
    # test_losses works it out by hand); the contrast, the empty prompt's prior being 0: 2.25 / 0.25 = 9, then 1 and 1
    text = torch.stack([torch.full((3, 5), v) for v in (-1.0, 0.0, 1.0)])
    x0, pids = torch.full((3, 4, 2, 2), 0.5), torch.tensor([0, 1, 2])
    for score, golden in (("classifier", [19, 19 / 9, 19 / 9]), ("contrast", [9, 1, 1])):
        detector = cal.Detector(PriorUNet(), SCHEDULER, (900, 950), 3.0, text, torch.zeros(1, 3, 5), score=score,
                                pairs=1)
        torch.testing.assert_close(detector.log_score(x0, pids, seed=0, batch_size=2)[0],
                                   torch.tensor(golden, dtype=torch.float64).log(), rtol=1e-4, atol=1e-4)


def test_calibration_samples_start_in_antithetic_pairs():
    from invdiff_rt.runtime.sampling import initial_latents

    shape = (4, 2, 2)
    x0, x2 = initial_latents(3, "a", 0, shape), initial_latents(3, "a", 2, shape)
    assert torch.equal(cal.antithetic_latents(3, "a", 0, shape), x0)
    assert torch.equal(cal.antithetic_latents(3, "a", 1, shape), -x0)  # the pair's second sample: negated
    assert torch.equal(cal.antithetic_latents(3, "a", 2, shape), x2) and not torch.equal(x2, x0)
    assert torch.equal(cal.antithetic_latents(3, "a", 3, shape), -x2)


def test_detector_scores_each_pair_with_its_own_seed(monkeypatch):
    from invdiff_rt.method import losses

    seen = []
    monkeypatch.setattr(losses, "band_score", lambda unet, sched, inputs, band, config, seed, batch_size:
                        seen.append((config.draws, config.score, band, seed)) or torch.ones(2, dtype=torch.float64))
    detector = cal.Detector(None, None, (900, 950), 3.0, torch.zeros(2, 3, 5), torch.zeros(1, 3, 5), pairs=3)
    scores = detector.log_score(torch.zeros(2, 4, 2, 2), torch.tensor([0, 1]), seed=7, batch_size=2)
    assert scores.shape == (3, 2)
    assert seen == [(2, "contrast", (900, 950), s) for s in (7, 7 + cal.PAIR_SEED_STEP, 7 + 2 * cal.PAIR_SEED_STEP)]
    assert cal.pair_seed(1000, 0) == 1000  # pair 0: the single pair of the rule before, same draws
    assert cal.CalibrateConfig().pairs == 4 and cal.Detector(None, None, (0, 1), 3.0, None, None).pairs == 4


def test_detector_flag_is_the_mean_step_of_its_pairs_against_one_pooled_cut():
    detector = cal.Detector(None, None, (900, 950), 3.0, None, None, pairs=2)
    pids = torch.tensor([0, 0, 0, 1])
    reference = torch.tensor([[0.0, 1.0, 2.0, 10.0], [1.0, 2.0, 3.0, 10.0]], dtype=torch.float64)
    detector.fit(reference, pids, 2)  # prompt 0: median 1 (pair 0) and 2 (pair 1), MAD 1 in both; prompt 1: one row,
    # no spread: MAD 0 (no outlier there)
    assert detector.median.tolist() == [1.5, 10.0] and detector.mad.tolist() == [1.0, 0.0]  # each pair's, averaged
    # k = 3 robust-z units = 3 * 1.4826 * MAD = 4.45 above the median 1.5: 6 is over it (z 3.035), 5 is not
    # (z 2.361), 9 is (z 5.059); prompt 1's rows sit on its median
    scores = torch.tensor([[6.0, 0.0, 0.0, 10.0], [5.0, 0.0, 9.0, 10.0]], dtype=torch.float64)
    assert detector.flags(scores, pids).tolist() == [0.5, 0.0, 0.5, 0.0]
    detector.width = 0.5  # the logistic step: sigmoid((z - 3) / 0.5) per pair, then the mean
    step = [1 / (1 + math.exp(-(z - 3.0) / 0.5)) for z in (4.5 / 1.4826, 3.5 / 1.4826, -1.5 / 1.4826, 7.5 / 1.4826)]
    soft = detector.flags(scores, pids)
    assert soft[:3].tolist() == pytest.approx([(step[0] + step[1]) / 2, step[2], (step[2] + step[3]) / 2], abs=1e-6)
    assert soft[3] == pytest.approx(1 / (1 + math.exp(6.0)), abs=1e-9)  # z 0: sigmoid(-3 / 0.5)


def test_centred_cut_takes_the_base_samples_median_and_keeps_the_training_mad():
    detector = cal.Detector(None, None, (900, 950), 3.0, None, None, pairs=2)
    pids = torch.tensor([0, 0, 0, 1])
    detector.fit(torch.tensor([[0.0, 1.0, 2.0, 10.0], [1.0, 2.0, 3.0, 10.0]], dtype=torch.float64), pids, 2)
    base = torch.tensor([[-3.0, -2.0, -1.0, 4.0], [-2.0, -1.0, 0.0, 6.0]], dtype=torch.float64)
    cut = cal.centred(detector, base, pids, 2)
    assert cut.median.tolist() == [-1.5, 5.0] and cut.mad.tolist() == [1.0, 0.0]  # medians -2 / -1 and 4 / 6
    assert detector.median.tolist() == [1.5, 10.0]  # the training cut itself is untouched
    # 2.95 is 4.45 (k = 3 robust-z units of MAD 1) above the base centre -1.5: flagged; 2.9 is not
    assert cut.flags(torch.tensor([[2.95, 2.9, 0.0, 5.0]], dtype=torch.float64), pids).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_scale_weight_reads_every_weight_against_the_cut_of_the_w0_samples(monkeypatch):
    """centre "base": the samples at w = 0 are drawn once, set the cut, and give r(0); "training": the rows' cut."""
    pids = torch.zeros(4, dtype=torch.long)
    drawn = []

    def scores(detector, model, adapter, inputs, config, scale, w):  # w = 0: log scores 0..3; each w shifts them
        drawn.append(w)
        return torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64) + 2.0 * w, pids

    monkeypatch.setattr(cal, "sample_scores", scores)
    detector = cal.Detector(None, None, (900, 950), 1.0, None, None, pairs=1)
    detector.median, detector.mad = torch.tensor([10.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    inputs = type("Inputs", (), {"prompts": ["p"]})()
    config = cal.CalibrateConfig(flag_width=0.0, max_evals=3)
    # base centre 1.5 (median of 0..3), cut at 1.5 + 1.4826 = 2.98: r(0) = 1/4, r(1) = 3/4 (scores 2..5)
    # and the search: w = 1 over r* 0.5, then w = 0 (no new draw), then the chord's 0.5 (scores 1..4: 2 of 4)
    assert cal.scale_weight(detector, None, None, inputs, 0.5, config, 3.0) == \
        (0.5, [(0.0, 0.25), (0.5, 0.5), (1.0, 0.75)])
    assert drawn == [0.0, 1.0, 0.5]
    drawn.clear()  # the training cut (median 10, cut 11.48): nothing over it up to w = 4, the search's top
    weight, tried = cal.scale_weight(detector, None, None, inputs, 0.5, replace(config, centre="training"), 3.0)
    assert (weight, tried, drawn) == (4.0, [(1.0, 0.0), (2.0, 0.0), (4.0, 0.0)], [1.0, 2.0, 4.0])


def test_reference_pairs_give_the_inferred_rows_enough_scorings():
    config = cal.CalibrateConfig(pairs=4, inferred_scorings=240)
    assert [cal.reference_pairs(config, n) for n in (30, 98, 4, 0)] == [8, 4, 16, 4]
    assert cal.reference_pairs(cal.CalibrateConfig(pairs=1, inferred_scorings=0), 30) == 1  # the rule before
    assert cal.reference_pairs(cal.CalibrateConfig(pairs=20), 30) == 20  # never fewer than the samples get


def test_a_calibration_with_other_rule_settings_replaces_the_recorded_table(tmp_path, monkeypatch):
    """Weights of another CFG scale are kept only when they came from the same rule, target rate, pairs, flag,
    samples, seed and sampling steps (the record's fields describe every scale in its table)."""
    from invdiff_rt.artifacts import atomic_write_json
    from invdiff_rt.method import adapter as adapter_mod
    from invdiff_rt.method import splits

    new = {"rule": cal.RULE, "target_rate": 0.5, "pairs": 4, "reference_pairs": 8, "flag_width": 0.5, "centre": "base",
           "paired": True, "per_prompt": 48, "seed": 1000, "steps": 25, "by_guidance_scale": {"3": {"weight": 1.3}}}
    monkeypatch.setattr(adapter_mod, "load_adapter", lambda folder, model: None)
    monkeypatch.setattr(splits, "as_trained", lambda groups, manifest, prompt_ids: groups)
    monkeypatch.setattr(cal, "calibrate", lambda *args: json.loads(json.dumps(new)))
    monkeypatch.setattr(cal, "check_groups_match", lambda groups, inputs: None)
    inputs = type("Inputs", (), {"prompt_ids": None})()
    for change, scales in (({"pairs": 1}, ["3"]), ({"flag_width": 0.0}, ["3"]), ({"reference_pairs": 4}, ["3"]),
                           ({"centre": "training"}, ["3"]), ({"per_prompt": 8}, ["3"]), ({"seed": 1}, ["3"]),
                           ({"steps": 20}, ["3"]), ({}, ["3", "7.5"])):
        old = {**new, **change, "by_guidance_scale": {"7.5": {"weight": 1.1}}}
        atomic_write_json(tmp_path / "adapter.json", {"format": adapter_mod.FORMAT, "calibration": old})
        record = cal.calibrate_adapter(None, tmp_path, inputs, None)
        assert sorted(record["by_guidance_scale"]) == scales
        saved = json.loads((tmp_path / "adapter.json").read_text())["calibration"]
        assert saved["pairs"] == 4 and sorted(saved["by_guidance_scale"]) == scales


def test_recorded_weight_prefers_calibration_then_nearest_scale_then_recipe_default():
    manifest = {"recipe": "invdiff-rt", "recommended_weight": 1.0,
                "calibration": {"by_guidance_scale": {"3": {"weight": 1.4}, "7.5": {"weight": 0.6}}}}
    assert cal.recorded_weight(manifest, 3.0)[0] == 1.4
    w, how = cal.recorded_weight(manifest, 6.0)
    assert w == 0.6 and "nearest calibrated CFG scale 7.5" in how
    w, how = cal.recorded_weight({"recipe": "paper", "recommended_weight": 1.6}, 3.0)
    assert w == 1.6 and "not calibrated" in how


def test_resolve_weight_says_where_the_weight_and_the_active_timesteps_come_from(tmp_path):
    from invdiff_rt.method.adapter import FORMAT, MANIFEST_NAME

    manifest = {"format": FORMAT, "recipe": "invdiff-rt", "recommended_weight": 1.0, "from_t": 800,
                "calibration": {"by_guidance_scale": {"3": {"weight": 1.4}}}}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    w, how = cal.resolve_weight(0.3, 3.0, adapter_dir=tmp_path)
    assert w == 0.3 and how == "given by --adapter-weight; the adapter acts at t >= 800 (adapter.json from_t)"
    w, how = cal.resolve_weight(None, 3.0, adapter_dir=tmp_path)
    assert w == 1.4 and how.startswith("calibrated label-free") and how.endswith("t >= 800 (adapter.json from_t)")
    assert cal.resolve_weight(None, 3.0) == (1.0, "no adapter (the weight has no effect)")


def test_a_weight_at_the_search_end_comes_with_a_warning():
    """Tried rates on both sides of r*: no note; all under it (the search's top) or all over (w = 0): a warning."""
    def manifest(tried):
        return {"calibration": {"target_rate": 0.3, "by_guidance_scale": {"3": {"weight": tried[-1][0],
                                                                               "tried": tried}}}}

    w, how = cal.recorded_weight(manifest([[1.0, 0.2], [1.5, 0.35]]), 3.0)
    assert how == f"calibrated label-free (rule {cal.RULE}, adapter.json)"
    w, how = cal.recorded_weight(manifest([[1.0, 0.11], [2.0, 0.08], [4.0, 0.06]]), 3.0)
    assert w == 4.0 and "WARNING: the flag rate stayed under the target 0.3 at every tried weight" in how
    assert "pass --adapter-weight" in how
    assert "stayed over the target" in cal.recorded_weight(manifest([[0.0, 0.39], [1.0, 0.33]]), 3.0)[1]
    assert cal.unbracketed_note({"by_guidance_scale": {"3": {"weight": 1.4}}}, "3") == ""  # nothing to judge by


def test_recorded_weight_of_an_uncalibrated_adapter_in_an_export_manifest():
    # an export records `calibration: None` for a paper-recipe adapter (bench/real_scale.sh's generate crashed on it)
    w, how = cal.recorded_weight({"recipe": "paper", "recommended_weight": 1.6, "calibration": None}, 3.0)
    assert w == 1.6 and "not calibrated" in how
    assert cal.recorded_weight({"recipe": "paper", "recommended_weight": None, "calibration": None}, 3.0)[0] == 1.0


# ---------------------------------------------------------------- the rule on a tiny model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny model, two-prompt coloured-squares data, inferred groups, a 20-step adapter (calibration off)."""
    import os

    from tests.test_method_cli import PROMPTS, _write_dataset
    from invdiff_rt.method.grouper import infer_groups, save_groups
    from invdiff_rt.method.losses import ProfileConfig
    from invdiff_rt.method.train import TrainConfig, train_adapter
    from invdiff_rt.models.loader import load_model
    from invdiff_rt.models.tiny import save_random_model

    tmp = tmp_path_factory.mktemp("calibrate")
    before = os.environ.get("INVDIFF_CACHE_DIR")
    os.environ["INVDIFF_CACHE_DIR"] = str(tmp / "cache")
    model = load_model(save_random_model(tmp / "model", PROMPTS, seed=0))
    data = _write_dataset(tmp / "data")
    groups = infer_groups(model, data, profile_config=ProfileConfig(grid_samples=12), show_progress=False,
                          outlier_k=1.0)
    save_groups(groups, tmp / "G")
    out = train_adapter(model, data, groups, tmp / "adapter",
                        TrainConfig(steps=20, batch_size=4, show_progress=False, calibrate=False, second_split=False))
    yield model, data, groups, out
    if before is None:
        os.environ.pop("INVDIFF_CACHE_DIR", None)
    else:
        os.environ["INVDIFF_CACHE_DIR"] = before


@pytest.mark.slow
def test_calibration_samples_do_not_depend_on_how_they_are_chunked(trained):
    """sample_latents runs its chunks in single-threaded workers side by side: five chunks of 2 give the rows of
    one chunk of 10 on two threads, in the same order, within float noise."""
    from tests.test_method_cli import PROMPTS
    from invdiff_rt.method.adapter import load_adapter
    from invdiff_rt.parallel import one_torch_thread

    model, _, _, out = trained
    args = (model, load_adapter(out, model), PROMPTS, 5, 1000, 3, 3.0, 1.5)
    with one_torch_thread() as before:
        torch.set_num_threads(2)  # map_batches runs workers only with >= 2 threads
        whole, chunked = cal.sample_latents(*args, batch_size=10), cal.sample_latents(*args, batch_size=2)
    assert torch.get_num_threads() == before
    assert whole.shape == (10, *model.latent_shape) and torch.isfinite(whole).all()
    assert (whole[0] - whole[1]).abs().max() > 0.1  # distinct samples: a reordering would show
    assert (chunked - whole).abs().max() <= 1e-5 * whole.abs().max(), (chunked - whole).abs().max()
    independent = cal.sample_latents(*args, batch_size=10, paired=False)
    assert (independent[0] - whole[0]).abs().max() <= 1e-5  # an even index starts where the sampler starts
    assert (independent[1] - whole[1]).abs().max() > 0.1  # an odd one from its neighbour's negated start


@pytest.mark.slow
def test_calibrate_on_tiny_model_golden(trained):
    from invdiff_rt.method.cache import base_inputs

    model, data, groups, out = trained
    config = cal.CalibrateConfig(per_prompt=4, min_samples=0, reference_per_prompt=10, steps=3, batch_size=16)
    record = cal.calibrate_adapter(model, out, base_inputs(model, data), groups, config)
    row = record["by_guidance_scale"]["3"]
    assert record["rule"] == cal.RULE and 0 <= record["target_rate"] <= 1
    assert any(w == 1.0 for w, _ in row["tried"])  # the search starts at the trained weight
    assert (record["target_rate"], row["weight"]) == pytest.approx(GOLDEN, abs=1e-3), (record, row)
    assert row["tried"] == GOLDEN_TRIED
    assert "stayed under the target" in cal.unbracketed_note(record, "3")  # the tiny model's samples never reach r*
    saved = json.loads((out / "adapter.json").read_text())
    assert saved["calibration"]["by_guidance_scale"]["3"]["weight"] == row["weight"]
    again = cal.calibrate_adapter(model, out, base_inputs(model, data), groups, config)
    assert again["by_guidance_scale"] == record["by_guidance_scale"]  # deterministic
    from invdiff_rt.method.adapter import load_adapter

    adapter, inputs = load_adapter(out, model), base_inputs(model, data)
    training = cal.calibrate(model, adapter, inputs, groups, replace(config, centre="training"))
    row = training["by_guidance_scale"]["3"]
    assert (training["target_rate"], row["weight"], row["tried"]) == GOLDEN_TRAINING_CUT
    before = cal.calibrate(model, adapter, inputs, groups,
                           replace(config, pairs=1, paired=False, flag_width=0.0, inferred_scorings=0,
                                   centre="training"))
    row = before["by_guidance_scale"]["3"]
    assert (before["target_rate"], row["weight"], row["tried"]) == GOLDEN_ONE_PAIR


# (target rate, weight) on the tiny random model (the default rule: 4 pairs a sample, the reference's raised for its
# few inferred rows, the logistic flag, paired samples, the cut centred on the base model's samples): its samples are
# noise to the contrast score and the adapter's are flagged less the more it weighs (0.11 at w = 1, 0.06 at w = 4),
# all under r*, so the search ends at max_weight; against the training rows' cut (the rule of 2026-12-05) every
# weight is flagged over r* and the search ends at w = 0; with one pair, the hard cut and independent samples, the
# rule before 2026-12-05, the golden values it had then
GOLDEN = (0.3032, 4.0)
GOLDEN_TRIED = [[1.0, 0.1075], [2.0, 0.0809], [4.0, 0.0598]]
GOLDEN_TRAINING_CUT = (0.3032, 0.0, [[0.0, 0.3912], [1.0, 0.3281]])
GOLDEN_ONE_PAIR = (0.1875, 0.0, [[0.0, 0.5], [1.0, 0.5]])


@pytest.mark.slow
def test_generate_without_weight_uses_recorded_weight(trained, tmp_path):
    from tests.test_method_cli import PROMPTS
    from invdiff_rt.artifacts import atomic_write_json
    from invdiff_rt.cli import app

    model, _, _, out = trained
    manifest = json.loads((out / "adapter.json").read_text())
    manifest["calibration"] = {"rule": cal.RULE, "by_guidance_scale": {"2": {"weight": 0.37}}}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter.safetensors").write_bytes((out / "adapter.safetensors").read_bytes())
    atomic_write_json(adapter / "adapter.json", manifest)
    args = ["generate", "--model", str(model.path), "--adapter", str(adapter), "--prompt", PROMPTS[0], "--num", "1",
            "--steps", "2", "--guidance-scale", "2", "--backend", "torch", "--no-grid"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "adapter weight 0.37: calibrated label-free" in r.output
    assert json.loads((tmp_path / "a" / "run.json").read_text())["settings"]["adapter_weight"] == 0.37
    r = CliRunner().invoke(app, [*args, "--adapter-weight", "0", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0 and json.loads((tmp_path / "b" / "run.json").read_text())["settings"]["adapter_weight"] == 0.0


def test_step_loss_regresses_the_shift_or_the_denoiser():
    from invdiff_rt.method.adapter import AdapterConfig, GuidanceAdapter
    from invdiff_rt.method.train import Batch, _step_loss

    adapter = GuidanceAdapter(AdapterConfig(in_channels=4, cross_attention_dim=8, width=8, depth=1, time_dim=8))
    g = torch.Generator().manual_seed(0)
    x, target, eps = (torch.randn(2, 4, 2, 2, generator=g) for _ in range(3))
    batch = Batch(torch.arange(2), x, torch.tensor([10, 900]), torch.randn(2, 3, 8, generator=g), x,
                  torch.ones(2, 1), target)
    shift = _step_loss(adapter, batch, eps, 0.0, True, "cpu", shift=True)  # zero-init: delta = 0
    assert torch.allclose(shift.loss, target.pow(2).flatten(1).mean(1).mean())
    rb = _step_loss(adapter, batch, eps, 0.0, True, "cpu")
    assert torch.allclose(rb.loss, (eps - target).pow(2).flatten(1).mean(1).mean())


def test_samples_per_prompt_reaches_the_minimum():
    config = cal.CalibrateConfig(per_prompt=16, min_samples=160)
    assert cal.samples_per_prompt(config, 10) == 16 and cal.samples_per_prompt(config, 2) == 80
    assert cal.samples_per_prompt(config, 3) == 54


def test_active_from_t_is_where_the_groups_reweighting_moves_the_posterior():
    from diffusers import DDPMScheduler

    from invdiff_rt.method.targets import active_from_t

    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    # one prompt: 12 latents of a majority mode (+1) and 4 of a minority mode (-1); JTT gives each half the mass
    latents = torch.cat([torch.ones(12, 4, 2, 2), -torch.ones(4, 4, 2, 2)]) + 0.1 * torch.randn(16, 4, 2, 2,
                                                                                                 generator=g)
    prompt_ids = torch.zeros(16, dtype=torch.long)
    jtt = torch.cat([torch.full((12,), 0.5 / 12), torch.full((4,), 0.5 / 4)])
    from_t, profile = active_from_t(sched, latents, prompt_ids, jtt)
    assert from_t == 450  # golden: the shift peaks at t = 500 (0.077 rms), 3/4 of it is first reached at 450
    assert profile["250"] == 0.0 and profile["500"] == pytest.approx(0.0775, abs=1e-3)
    assert active_from_t(sched, latents, prompt_ids, torch.full((16,), 1 / 16))[0] == 0  # no reweighting: every t


def _groups_of(fingerprint: str, rows: int = 4):
    from types import SimpleNamespace

    weights = torch.zeros(rows, 2)
    return SimpleNamespace(fingerprint=fingerprint, grouping=SimpleNamespace(weights=weights),
                           meta={"fingerprint": fingerprint, "data_fingerprint": "d" * 64, "base_fingerprint": "b" * 64})


@pytest.mark.parametrize("manifest, message", [
    ({"recipe": "erm", "groups_source": "none"}, "--adapter A: trained with recipe erm on groups none"),
    ({"recipe": "paper", "groups_source": "inferred", "groups_fingerprint": "f" * 64}, "with recipe paper"),
    ({"recipe": "invdiff-rt", "groups_source": "oracle:color"}, "on groups oracle:color"),
    ({"recipe": "invdiff-rt", "groups_source": "inferred", "groups_fingerprint": "e" * 64},
     "--groups G: the adapter was trained on other groups (eeeeeeeeeeee, these are ffffffffffff)")])
def test_calibrate_refuses_an_adapter_the_rule_does_not_apply_to(manifest, message):
    """The weight would be recorded for an erm/paper/oracle adapter, or from groups it was not trained on."""
    with pytest.raises(InvdiffError) as e:
        cal.check_calibratable(manifest, _groups_of("f" * 64), "A", "G")
    assert message in str(e.value) and "\n" not in str(e.value)
    cal.check_calibratable({"recipe": "invdiff-rt", "groups_source": "inferred", "groups_fingerprint": "f" * 64},
                           _groups_of("f" * 64), "A", "G")


def test_calibrate_refuses_listed_rows_past_the_data():
    """A hand-edited second_split listing a row past the data reached an IndexError inside calibration."""
    manifest = {"recipe": "invdiff-rt", "groups_source": "inferred", "groups_fingerprint": "f" * 64,
                "second_split": {"refined_rows": [0, 3], "joint_rows": [1, 4]}}
    with pytest.raises(InvdiffError) as e:
        cal.check_calibratable(manifest, _groups_of("f" * 64), "A", "G")
    assert str(e.value) == ("--adapter A: adapter.json's second_split.joint_rows lists row 4, past the data's 4 rows; "
                            "restore its adapter.json or train it again")
    manifest["second_split"]["joint_rows"] = [1, 3]
    cal.check_calibratable(manifest, _groups_of("f" * 64), "A", "G")


def test_groups_of_another_dataset_are_refused():
    from types import SimpleNamespace

    from invdiff_rt.method.grouper import check_groups_match

    inputs = SimpleNamespace(data_fingerprint="c" * 64, base_fingerprint="b" * 64, latents=torch.zeros(4, 1))
    with pytest.raises(InvdiffError, match=r"--groups: made for --data dddddddddddd, got cccccccccccc"):
        check_groups_match(_groups_of("f" * 64), inputs)
    inputs.data_fingerprint = "d" * 64
    check_groups_match(_groups_of("f" * 64), inputs)
    with pytest.raises(InvdiffError, match="row count does not match"):
        check_groups_match(_groups_of("f" * 64, rows=3), inputs)
