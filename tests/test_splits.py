"""The second split (method/splits.py): the candidate, the test's arithmetic, and the sampler it switches to."""

import math

import pytest
import torch

from invdiff_rt.method import grouper, splits


def test_candidate_is_a_robust_z_cut_among_the_rows_outside_the_first_split():
    # prompt 0: rest scores 0..9 (torch's lower median 4, MAD 2 -> sd 2.9652): 9 is z 1.686 > 1.5, 8 is z 1.349
    score = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100.0, 3, 3, 3, 3], dtype=torch.float64)
    pids = torch.tensor([0] * 11 + [1] * 4)
    first = torch.zeros(15, dtype=torch.bool)
    first[10] = True  # the first split's row is not a candidate however high it scores, nor counted in the median
    flags = splits.candidate_split(score, first, pids, k=1.5)
    assert flags.nonzero().flatten().tolist() == [9]  # prompt 1: every row at its median, z 0
    assert splits.candidate_split(score, first, pids, k=1.3).nonzero().flatten().tolist() == [8, 9]


def test_candidate_score_sums_its_levels_and_the_log_of_the_first_splits_band_score(monkeypatch):
    calls = []

    def level(unet, scheduler, inputs, t, seed, key, score, batch_size, advance=None):
        calls.append((t, key, score))
        return torch.full((3,), float(t), dtype=torch.float64)

    monkeypatch.setattr(splits, "log_score_at", level)
    band = torch.tensor([1.0, math.e, math.e ** 2])  # float32, as the profile stores it
    score = splits.candidate_score(None, None, None, band, seed=0, batch_size=8)
    # one pair per level, each level's noise keyed by its index (the draws of the five-level candidate's first four)
    assert calls == [(700, 0, "contrast"), (800, 1, "contrast"), (850, 2, "contrast"), (925, 3, "contrast")]
    assert score.dtype == torch.float64
    assert score.tolist() == pytest.approx([3275.0, 3276.0, 3277.0])


def test_candidates_top_level_is_the_bands_contrast_score_reused_or_drawn_again(monkeypatch):
    from types import SimpleNamespace

    from invdiff_rt.method import losses

    seen = {}

    def band_score(unet, scheduler, inputs, band, config, seed, batch_size, advance=None):
        seen["drawn"] = (band, config.score, config.draws, config.antithetic, seed)
        return torch.full((4,), 2.0, dtype=torch.float64)

    def candidate_score(unet, scheduler, inputs, band, seed, batch_size, advance=None):
        seen["top"] = band.tolist()
        return torch.zeros(4, dtype=torch.float64)

    monkeypatch.setattr(losses, "band_score", band_score)
    monkeypatch.setattr(splits, "candidate_score", candidate_score)
    profile, model = losses.Profile(torch.full((4,), 5.0), (950, 999)), SimpleNamespace(unet=None)
    inputs = SimpleNamespace(prompt_ids=torch.zeros(4, dtype=torch.long))
    args = (model, None, inputs, grouper.group_erm(4), profile)
    grouper._candidate_of(*args, losses.ProfileConfig(), 7, 8, None)  # contrast groups: their own score, reused
    assert seen == {"top": [5.0] * 4}
    classifier = losses.ProfileConfig(score="classifier", draws=4, antithetic=False)  # not a contrast: drawn again,
    grouper._candidate_of(*args, classifier, 7, 8, None)  # on the band's own draws
    assert seen == {"top": [2.0] * 4, "drawn": ((950, 999), "contrast", 4, False, 7)}


def test_excess_is_the_median_above_the_rest_median_per_prompt():
    log_score = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 1.0, 2.0, 5.0, 7.0])
    pids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    rows = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    rest = ~rows
    # prompt 0: rest median 2 -> row 3 is +8; prompt 1: rest median 1 -> row 7 is +4; prompt 2 has no rest rows and
    # is left out; median of (8, 4) = 4 (torch takes the lower of the two middle values)
    assert splits.excess(log_score, rows, rest, pids) == 4.0
    assert math.isnan(splits.excess(log_score, pids == 2, pids != 2, pids))


def test_result_ratio_and_verdict_hand_values():
    r = splits.AttributeTest(first_excess=(0.5, 0.05), second_excess=(0.2, 0.22), rows=10)
    assert r.removed == pytest.approx((0.9, -0.1))
    assert r.ratio == pytest.approx(-0.1 / 0.9) and r.second_attribute
    assert r.record()["ratio"] == -0.1111 and r.record()["second_attribute"] is True
    assert r.record()["weight"] == splits.TEST_WEIGHT == 1.35
    r = splits.AttributeTest(first_excess=(0.5, 0.0), second_excess=(0.2, 0.1), rows=10)
    assert r.ratio == pytest.approx(0.5) and not r.second_attribute
    for first, second in (((0.5, 0.5), (0.2, 0.0)),  # the adapter removed none of the first split's excess
                          ((0.5, 0.1), (-0.01, 0.3)),  # the candidate shows no excess under the base
                          ((0.5, 0.1), (float("nan"), 0.3))):  # no excess could be measured
        undecided = splits.AttributeTest(first, second, rows=10)
        assert math.isnan(undecided.ratio) and not undecided.second_attribute
        assert undecided.record()["ratio"] is None


def test_with_second_split_rakes_both_splits():
    pids = torch.arange(40) // 20
    first, second = torch.zeros(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)
    first[[0, 1, 20]], second[[2, 3, 4, 21, 22]] = True, True
    g = grouper.group_robust(torch.rand(40), pids)
    g.inferred, g.candidate = first, second
    two = splits.with_second_split(g, pids)
    for rows in (first, second):
        for p in (0, 1):
            share = two.sampling[rows & (pids == p)].sum() / two.sampling[pids == p].sum()
            assert float(share) == pytest.approx(0.5, abs=0.01)  # disjoint splits: the rows in neither -> 0
    assert torch.equal(two.inferred, first | second) and two.score is g.score and two.candidate is None
    assert two.weights.shape == (40, 3)  # cells: neither, first, second


def test_candidate_presence_and_finetune_steps():
    g = grouper.group_robust(torch.rand(40), torch.arange(40) // 20)
    assert not splits.has_candidate(g)
    g.candidate = torch.zeros(40, dtype=torch.bool)
    assert not splits.has_candidate(g)  # an empty candidate: nothing to test
    g.candidate[3] = True
    assert splits.has_candidate(g)
    assert splits.finetune_steps(5000) == 1500 and splits.finetune_steps(2) == 1


def test_describe_says_what_was_decided():
    test = {"candidate_size": 423, "weight": 1.35, "ratio": -0.245, "threshold": 0.1, "second_attribute": True,
            "finetune_steps": 1500}
    assert splits.describe(test) == ("candidate second split (423 rows): the trained adapter at w 1.35 removed -0.24 "
                                     "of its excess score relative to the first split's (threshold 0.1) -> a second "
                                     "attribute: fine-tuned 1500 steps with both splits balanced")
    assert splits.describe({**test, "ratio": None, "second_attribute": False}).endswith(
        "removed an undefined share (no excess to remove) of its excess score relative to the first split's "
        "(threshold 0.1) -> nothing to compare with: not added")
    assert splits.describe({**test, "second_attribute": False}).endswith("-> more of the first attribute: not added")
    assert splits.describe({**test, "refined_size": 347}).endswith(
        "-> a second attribute, refined to 347 rows: fine-tuned 1500 steps with both splits balanced")
    assert splits.describe({**test, "refined_size": 347, "finetune_temperature": 2.0}).endswith(
        "refined to 347 rows: fine-tuned 1500 steps with both splits balanced (posterior temperature 2)")
    assert splits.describe({**test, "refined_size": 347, "joint_rows": [4, 9, 17], "joint_fraction": 0.5}).endswith(
        "refined to 347 rows (3 first-split rows that read like it get 0.5 of the first split's mass): fine-tuned "
        "1500 steps with both splits balanced")
    assert splits.describe(None) == "no candidate second split was tested"


def test_as_trained_adds_the_second_split_only_when_the_test_did_and_the_refined_one_where_listed():
    pids = torch.arange(40) // 20
    g = grouper.group_robust(torch.rand(40), pids)
    g.candidate = torch.zeros(40, dtype=torch.bool)
    g.candidate[[5, 6, 25]] = True
    groups = grouper.GroupsResult(g, {"recipe": "invdiff-rt"})
    assert splits.as_trained(groups, {}, pids) is groups
    assert splits.as_trained(groups, {"second_split": {"second_attribute": False}}, pids) is groups
    two = splits.as_trained(groups, {"second_split": {"second_attribute": True}}, pids)
    assert two.meta is groups.meta
    assert torch.equal(two.grouping.sampling, splits.with_second_split(g, pids).sampling)
    # adapters trained since the refinement list their second split; calibration weighs that one
    refined = {"second_split": {"second_attribute": True, "refined_rows": [6, 7, 26]}}
    second = torch.zeros(40, dtype=torch.bool)
    second[[6, 7, 26]] = True
    assert torch.equal(splits.recorded_rows(refined["second_split"], 40), second)
    assert torch.equal(splits.as_trained(groups, refined, pids).grouping.sampling,
                       splits.with_second_split(g, pids, second).sampling)
    assert not torch.equal(second, g.candidate)
    # ... and, since the joint rows, the first split's rows weighed up with their fraction
    joint = {"second_split": {**refined["second_split"], "joint_rows": [0, 1], "joint_fraction": 0.3}}
    flags = torch.zeros(40, dtype=torch.bool)
    flags[[0, 1]] = True
    assert torch.equal(splits.as_trained(groups, joint, pids).grouping.sampling,
                       splits.with_second_split(g, pids, second, flags & g.inferred, 0.3).sampling)
    assert splits.trained_splits({}, 40) == (None, None, splits.JOINT_FRACTION)


def test_fill_joint_weighs_up_the_joint_rows_and_gives_as_much_of_the_second_split_to_the_rest():
    """The joint rows hold both minorities: the mass they get inside the first split counts as the second
    attribute's minority, so the second split gives as much to the rows in neither (styled-digits' stroke minority
    got 0.75 of each prompt's mass in the target with a refined split of precision 0.75, and the adapter drew
    digits 4 and 7 at a stroke majority share of 0.05-0.19)."""
    pids = torch.arange(12) // 6
    first = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    second = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    joint = torch.tensor([1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)  # prompt 1: every first row
    sampling = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.2, 0.1, 0.25, 0.25, 0.1, 0.1, 0.2, 0.1])
    filled = splits.fill_joint(sampling, pids, first, second, joint, 0.5)
    # prompt 0: the first split's 0.5 -> 0.25 on row 0, 0.25 on rows 1-2 as 1 : 3; the second split's 0.4 gives
    # 0.25 to row 5, the one row in neither; prompt 1 (no first-split row outside the joint ones) unchanged
    expected = torch.tensor([0.25, 0.0625, 0.1875, 0.075, 0.075, 0.35, 0.25, 0.25, 0.1, 0.1, 0.2, 0.1])
    assert torch.allclose(filled, expected, atol=1e-7) and filled.dtype == sampling.dtype
    none = torch.zeros(12, dtype=torch.bool)
    assert torch.equal(splits.fill_joint(sampling, pids, first, second, none), sampling)
    raked = torch.tensor([0.25, 0.125, 0.125, 0.24, 0.26, 0.0, 0.25, 0.25, 0.1, 0.1, 0.2, 0.1])  # none in neither
    assert torch.allclose(splits.fill_joint(raked, pids, first, second, joint, 0.5)[:6],
                          torch.tensor([0.25, 0.125, 0.125, 0.24, 0.26, 0.0]))  # has nowhere to go: kept


def _planted(seed: int = 0):
    """Two prompts of 120 images (8x8, 3 channels, noise): a first attribute (the red channel bright, rows 0-11 of
    each prompt; the first split holds rows 0-5) and a second one (a bright bar in the top rows, rows 12-35); a
    candidate that holds the 6 first-attribute rows the first split missed, 12 of the 24 second-attribute rows and
    12 plain rows of each prompt."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(240, 3, 8, 8, generator=g) * 0.3
    pids = torch.arange(240) // 120
    first, candidate = torch.zeros(240, dtype=torch.bool), torch.zeros(240, dtype=torch.bool)
    truth = torch.zeros(240, dtype=torch.bool)
    for p in (0, 1):
        o = 120 * p
        x[o:o + 12, 0] += 2.0
        x[o + 12:o + 36, :, :2] += 2.0
        truth[o + 12:o + 36] = True
        first[o:o + 6] = True
        candidate[o + 6:o + 12] = candidate[o + 12:o + 24] = candidate[o + 60:o + 72] = True
    return x, pids, first, candidate, truth


def test_joint_rows_are_the_first_splits_rows_that_look_like_the_second_attribute():
    x, pids, first, candidate, truth = _planted()
    for p in (0, 1):  # rows 0-2 of each prompt's first split also carry the second attribute's bar
        x[120 * p:120 * p + 3, :, :2] += 2.0
    second = truth & ~first
    joint = splits.joint_rows(x, pids, first, second, 2)
    assert torch.equal(splits.joint_rows(x, pids, first, second, 2), joint)  # seeded
    assert not (joint & ~first).any()
    expected = torch.zeros(240, dtype=torch.bool)
    expected[[0, 1, 2, 120, 121, 122]] = True
    assert torch.equal(joint, expected)
    x[:, 0] += 3.0  # a bright red channel on every image: the readers see grey images (max over channels), and
    assert torch.equal(splits.joint_rows(x, pids, first, second, 2), expected)  # still the bar
    none = torch.zeros(240, dtype=torch.bool)
    assert not splits.joint_rows(x, pids, first, none, 2).any()  # an empty second split: nothing to read it as


def test_refine_cleans_the_candidate_of_the_first_attribute_and_reranks_it_by_a_reader():
    x, pids, first, candidate, truth = _planted()
    refined = splits.refine(x, pids, first, candidate, 2)
    assert torch.equal(splits.refine(x, pids, first, candidate, 2), refined)  # seeded: the same split every time
    assert not (refined & first).any() and not (refined & ~truth & (torch.arange(240) % 120 < 12)).any()
    sizes = [int(refined[pids == p].sum()) for p in (0, 1)]
    cleaned, allowed = splits.clean(x, pids, first, candidate, 2)
    assert sizes == [int(cleaned[pids == p].sum()) for p in (0, 1)] and 24 <= sum(sizes) <= 60
    assert not (cleaned & (torch.arange(240) % 120 < 12)).any()  # the first attribute's missed rows are dropped
    precision = lambda flags: float((flags & truth).sum() / flags.sum())  # noqa: E731
    assert precision(candidate) == pytest.approx(0.4) and precision(refined) > 0.9  # 12 / 30 -> the bar rows
    assert int((refined & truth).sum()) > int((candidate & truth).sum())  # and more of them than the candidate had
    empty = splits.refine(x, pids, first, candidate & (torch.arange(240) % 120 < 12), 2)
    assert not empty.any()  # a candidate of first-attribute rows only: nothing left to refine


def _opposite_sides(prompts: int = 6, n: int = 120):
    """One attribute, a bright bar (the top two rows), whose minority side differs between prompts: in prompts 0-2
    rows 0-23 have the bar, in 3-5 they are the ones without it. The flags: 16 of each prompt's 24 minority rows and
    8 of its majority rows (precision 2/3)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(prompts * n, 3, 8, 8, generator=g) * 0.3
    pids, row = torch.arange(prompts * n) // n, torch.arange(prompts * n) % n
    truth = row < 24
    x[truth ^ (pids >= prompts // 2), :, :2] += 2.0
    flags = (row < 16) | ((row >= 100) & (row < 108))
    return x, pids, flags, truth


def test_rerank_reads_an_attribute_whose_minority_side_differs_between_prompts(monkeypatch):
    """styled-digits' stroke minority is thin for digits 0-4 and thick for 5-9: the reranking reader is one score
    shared by the prompts with a scale and a bias of each prompt, whose scales start near 0 and learn fast, so that
    each prompt's sign is learnt (bench/results/debiasing.md, *A shared reader for the refinement*)."""
    from invdiff_rt.method import drawn

    torch.set_num_threads(1)
    x, pids, flags, truth = _opposite_sides()
    allowed, counts = torch.ones_like(flags), [24] * 6
    reranked = splits.rerank(x, pids, flags, allowed, counts, 6, seed=10)
    assert torch.equal(reranked, truth)  # every prompt's 24 minority rows, from flags of precision 2/3
    scales = drawn.fit_shared_reader(x, pids, flags, 6, seed=10).scale.detach()
    assert (scales[:3] > 0.2).all() and (scales[3:] < -0.2).all()  # opposite signs (golden: 0.31-0.36, -0.25-0.29)
    monkeypatch.setattr(drawn, "SHARED_SCALE", 1.0)  # scales started at 1 and learnt at the score's rate: no sign
    monkeypatch.setattr(drawn, "SHARED_SCALE_LR", 1.0)  # flips, and prompts 3-5 get their majority rows
    reranked = splits.rerank(x, pids, flags, allowed, counts, 6, seed=10)
    assert not (reranked & truth & (pids >= 3)).any()
