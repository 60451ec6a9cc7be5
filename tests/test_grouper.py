import math

import pytest
import torch

from invdiff_rt.method import grouper



def _planted(n=2000, prompts=4, frac=0.05, seed=0):
    """Log-normal losses, each prompt on its own scale; a 5 % minority per prompt has loss x e^1.5."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.arange(n) % prompts
    minority = torch.rand(n, generator=g) < frac
    log_loss = 0.25 * torch.randn(n, generator=g) + prompt_ids.float() * 0.7 + 1.5 * minority.float()
    return log_loss.exp(), prompt_ids, minority


def test_project_rows_hand_values():
    w = torch.tensor([[1.0, -1.0, 3.0], [0.0, 0.0, -2.0]])
    out = grouper.project_rows(w)
    assert torch.allclose(out, torch.tensor([[0.25, 0.0, 0.75], [1 / 3, 1 / 3, 1 / 3]]))


def test_paper_grouper_simplex_and_deterministic():
    losses, _, _ = _planted(n=300)
    w1 = grouper.paper_soft_grouper(losses, groups=4, seed=3, iters=50)
    w2 = grouper.paper_soft_grouper(losses, groups=4, seed=3, iters=50)
    assert w1.shape == (300, 4)
    assert (w1 >= 0).all() and torch.allclose(w1.sum(1), torch.ones(300), atol=1e-6)
    assert torch.equal(w1, w2)
    assert not torch.equal(w1, grouper.paper_soft_grouper(losses, groups=4, seed=4, iters=50))
    # it increases the dispersion of group means over the random init
    init = grouper.project_rows(torch.rand(300, 4, generator=torch.Generator().manual_seed(3)))
    std = lambda w: grouper.soft_group_means(losses, w).std()  # noqa: E731
    assert std(w1) > 2 * std(init)


def test_robust_z_hand_values():
    scores = torch.tensor([1.0, 2.0, 4.0, 8.0, 20.0]).exp()  # log = 1, 2, 4, 8, 20
    z = grouper.robust_prompt_z(scores, torch.zeros(5, dtype=torch.long))
    # median 4, |x-4| = 3,2,0,4,16 -> MAD 3
    expected = (torch.tensor([1.0, 2, 4, 8, 20]) - 4) / (3 * grouper.MAD_TO_SD)
    assert torch.allclose(z, expected)


def test_a_prompt_without_spread_has_no_outlier():
    """Prompt 1 has two rows: its median is the lower one and its MAD 0, which made the other row z ~ 1e10, always
    in the minority (and a calibration cut of width 0); now neither row of it is an outlier, prompt 0 as before."""
    scores = torch.tensor([1.0, 2.0, 4.0, 8.0, 20.0, 3.0, 9.0]).exp()
    ids = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    z = grouper.robust_prompt_z(scores, ids)
    assert torch.equal(z[5:], torch.zeros(2)) and z[4] == pytest.approx(16 / (3 * grouper.MAD_TO_SD))
    assert grouper.outlier_split(z).tolist() == [False, False, False, False, True, False, False]
    median, mad = grouper.prompt_median_mad(torch.tensor([5.0, 5.0, 5.0, 1.0]), torch.tensor([0, 0, 0, 1]), 3)
    assert median.tolist() == [5.0, 1.0, 0.0] and mad.tolist() == [0.0, 0.0, 1.0]
    z = grouper.robust_z(torch.tensor([9.0, 2.0]), median, mad, torch.tensor([0, 1]))
    assert z.tolist() == [0.0, 0.0]  # no spread: no outlier, however far


def test_jtt_weights_half_of_each_prompt():
    prompt_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    minority = torch.tensor([True, False, False, False, False, False, False])
    s = grouper.jtt_sampling_weights(minority, prompt_ids)
    assert torch.allclose(s, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3, 1, 1, 1]))


def test_raking_balances_each_attribute_and_keeps_prompt_mass():
    # prompt 0: cells (maj,maj) x4, (min,maj) x1, (maj,min) x2, (min,min) x1; prompt 1: no minority of attribute 0
    prompt_ids = torch.tensor([0] * 8 + [1] * 4)
    flags = torch.tensor([[0, 0]] * 4 + [[1, 0], [0, 1], [0, 1], [1, 1]] + [[0, 0], [0, 0], [0, 1], [0, 0]]).bool()
    s = grouper.raked_sampling_weights(flags, prompt_ids).double()
    for p, n in ((0, 8), (1, 4)):
        sel = prompt_ids == p
        assert s[sel].sum().item() == pytest.approx(n, rel=1e-6)
        assert s[sel & flags[:, 1]].sum().item() == pytest.approx(n / 2, rel=1e-5)
    assert s[:8][flags[:8, 0]].sum().item() == pytest.approx(4, rel=1e-5)
    assert torch.allclose(s[8:], torch.tensor([2 / 3, 2 / 3, 2, 2 / 3], dtype=torch.float64), atol=1e-6)
    # prompt 0 by hand: raking keeps the table's odds ratio (4 * 1 / (1 * 2) = 2), so the cell masses solve
    # m00 * m11 = 2 * m10 * m01 with both marginals at 4: m10 = m01 = 4 (sqrt 2 - 1), m00 = m11 = 4 - m10
    m = 4 * (2 ** 0.5 - 1)
    assert s[:8].tolist() == pytest.approx([(4 - m) / 4] * 4 + [m, m / 2, m / 2, 4 - m], rel=1e-5)
    # one attribute: exactly the JTT weights
    assert torch.equal(grouper.raked_sampling_weights(flags[:, :1], prompt_ids),
                       grouper.jtt_sampling_weights(flags[:, 0], prompt_ids))


def test_oracle_groups_from_two_columns_are_cells():
    prompt_ids = torch.tensor([0] * 8)
    flags = torch.tensor([[0, 0]] * 4 + [[1, 0], [0, 1], [0, 1], [1, 1]]).bool()
    g = grouper.group_from_flags(flags, prompt_ids, "invdiff-rt")
    assert g.weights.sum(0).tolist() == [4, 1, 2, 1]  # cells 00, 10, 01, 11 in code order
    assert g.inferred.tolist() == [False] * 4 + [True] * 4
    assert g.sampling.sum().item() == pytest.approx(8, rel=1e-6)
    assert g.sampling[[4, 7]].sum().item() == pytest.approx(4, rel=1e-5)  # attribute 0's minority: half
    assert g.sampling.tolist() != grouper.group_from_flags(flags, prompt_ids, "paper").sampling.tolist()


def test_effective_weights_hand_values():
    w = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]])
    eff = grouper.effective_weights(w, torch.ones(4))
    assert torch.allclose(eff, torch.tensor([1 / 6, 1 / 6, 1 / 6, 0.5]))
    assert torch.allclose(grouper.effective_weights(torch.ones(4, 1), torch.tensor([1.0, 1, 1, 3])),
                          torch.tensor([1 / 6, 1 / 6, 1 / 6, 0.5]))


def test_default_recipe_isolates_planted_minority():
    losses, prompt_ids, minority = _planted()
    g = grouper.group_robust(losses, prompt_ids)
    d = grouper.group_diagnostics(g.score, g.inferred, g.weights, g.sampling, minority)
    assert d["auroc"] > 0.95
    assert d["precision"] > 0.9 and d["recall"] > 0.5
    assert d["minority_effective_weight"] >= 0.35
    # the paper grouper runs on the same profile; it is only required to produce valid groups (soft weights)
    p = grouper.group_paper(losses, groups=4, seed=0, iters=100)
    assert torch.allclose(p.weights.sum(1), torch.ones(len(losses)), atol=1e-5)


def test_prompt_minority_from_column():
    prompt_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    flags = grouper.prompt_minority(["red", "red", "green", "green", "green", "red"], prompt_ids)
    assert flags.tolist() == [False, False, True, False, False, True]


def test_auroc_hand_values_with_ties():
    score = torch.tensor([0.1, 0.4, 0.4, 0.8])
    pos = torch.tensor([False, True, False, True])
    # pairs (pos, neg): (0.4,0.1)=1, (0.4,0.4)=0.5, (0.8,0.1)=1, (0.8,0.4)=1 -> 3.5 / 4
    assert grouper.auroc(score, pos) == 0.875
    assert grouper.auroc(score, torch.zeros(4, dtype=torch.bool)) != grouper.auroc(score, torch.zeros(4, dtype=torch.bool))


def test_sampler_prior_reweights_each_prompt_to_the_drawn_shares():
    """Prompt 0: one minority row of four (data 0.75 majority), drawn at 0.9 -> majority rows 0.9 / 0.75, the
    minority row 0.1 / 0.25; prompt 1 has no minority row and keeps 1."""
    minority = torch.tensor([True, False, False, False, False, False])
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    got = grouper.sampler_prior(minority, ids, [0.9, 0.99])
    assert torch.allclose(got, torch.tensor([0.4, 1.2, 1.2, 1.2, 1.0, 1.0]))
    # a second attribute, minority rows 1 and 4 (prompt 0: 0.25 of the data, drawn 0.5 -> its minority 0.5 / 0.25,
    # majority 0.5 / 0.75; prompt 1: 0.5 of the data, drawn 0.8 -> 0.2 / 0.5 and 0.8 / 0.5): each row's product,
    # rescaled to mean 1 per prompt (prompt 0's products average 16 / 15: its two attributes are not independent)
    second = torch.tensor([False, True, False, False, True, False])
    got = grouper.sampler_prior(torch.stack([minority, second], 1), ids, [[0.9, 0.99], [0.5, 0.8]])
    product_0 = torch.tensor([0.4 * 2 / 3, 1.2 * 2, 1.2 * 2 / 3, 1.2 * 2 / 3])
    assert torch.allclose(got, torch.cat([product_0 * 15 / 16, torch.tensor([0.4, 1.6])]))


@pytest.mark.parametrize("field, value", [("grouping", None), ("profile", "x"), ("groups", "two"), ("prompts", "0"),
                                          ("recipe", 5)])
def test_a_groups_file_with_a_malformed_field_is_refused_in_one_line(tmp_path, field, value):
    import json

    from invdiff_rt.errors import InvdiffError

    g = grouper.Grouping(torch.ones(4, 2), torch.zeros(4), torch.ones(4), torch.zeros(4, dtype=torch.bool))
    _, json_path = grouper.save_groups(grouper.GroupsResult(g, {"groups": 2, "grouping": {}, "profile": {}}),
                                       tmp_path / "G")
    assert grouper.load_groups(tmp_path / "G").meta["groups"] == 2
    json_path.write_text(json.dumps({**json.loads(json_path.read_text()), field: value}))
    with pytest.raises(InvdiffError, match=rf"^{json_path}: malformed \({field} is not a "
                                           rf"{grouper.META_TYPES[field].__name__}\); rerun `invdiff groups`$"):
        grouper.load_groups(tmp_path / "G")


PROFILE = {"source": "inferred", "band": [950, 999], "outlier_k": 3.0, "score": "contrast"}


@pytest.mark.parametrize("profile, tensors, message", [
    ({k: v for k, v in PROFILE.items() if k != "band"}, {}, "profile.band None is not two timesteps"),
    ({**PROFILE, "band": [900, 100]}, {}, r"profile.band \[900, 100\] is not two timesteps lo <= hi in 0..999"),
    ({**PROFILE, "band": [-5, 2000]}, {}, "profile.band"),
    ({**PROFILE, "outlier_k": "x"}, {}, "profile.outlier_k 'x' is not a positive number"),
    ({**PROFILE, "outlier_k": -1}, {}, "profile.outlier_k -1 is not a positive number"),
    ({**PROFILE, "score": "nope"}, {}, "profile.score 'nope' is not one of contrast, classifier"),
    (PROFILE, {"sampling_weights": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, "sampling_weights are not finite"),
    (PROFILE, {"sampling_weights": -torch.ones(4)}, "sampling_weights are not finite"),
    (PROFILE, {"score": torch.zeros(4, 1)}, "the tensors hold different row counts"),
])
def test_groups_a_training_would_fail_on_after_its_last_step_are_refused_when_loaded(tmp_path, profile, tensors,
                                                                                      message):
    """A hand-edited profile reached a KeyError, a randint or add_noise traceback in calibration, after `train` had
    run every step; NaN or negative sampling weights a multinomial traceback."""
    from invdiff_rt.errors import InvdiffError

    def saved(prefix, profile, **edits):
        t = {"weights": torch.ones(4, 2), "score": torch.zeros(4), "sampling_weights": torch.ones(4), **edits}
        g = grouper.Grouping(t["weights"], t["score"], t["sampling_weights"], torch.zeros(4, dtype=torch.bool))
        meta = {"groups": 2, "grouping": {}, "profile": profile}
        return grouper.save_groups(grouper.GroupsResult(g, meta), tmp_path / prefix)[1]

    saved("ok", PROFILE)
    assert grouper.load_groups(tmp_path / "ok").meta["profile"] == PROFILE
    json_path = saved("G", profile, **tensors)
    with pytest.raises(InvdiffError, match=rf"^{json_path}: malformed \({message}.*\); rerun `invdiff groups`$"):
        grouper.load_groups(tmp_path / "G")
