import pytest
import torch

from invdiff_rt.method.objective import invariance_objective, per_sample_loss



def test_two_groups_hand_computed_raw_variance():
    losses = torch.tensor([1.0, 3.0, 10.0])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = invariance_objective(losses, weights, lam=0.5, scale_aware=False)
    # L_0 = 2, L_1 = 10; mean 6; unbiased var = ((2-6)^2 + (10-6)^2) / 1 = 32
    assert t.mean.item() == pytest.approx(6.0)
    assert t.penalty.item() == pytest.approx(32.0)
    assert t.loss.item() == pytest.approx(6.0 + 0.5 * 32.0)
    assert int(t.groups_present) == 2


def test_scale_aware_variance_is_squared_cv():
    losses = torch.tensor([1.0, 3.0, 10.0])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = invariance_objective(losses, weights, lam=1.0, scale_aware=True)
    assert t.penalty.item() == pytest.approx(32.0 / 36.0)
    assert t.loss.item() == pytest.approx(6.0 + 32.0 / 36.0)


def test_soft_weights_and_zero_mass_group_skipped():
    losses = torch.tensor([2.0, 4.0, 6.0])
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.75, 0.25]])
    t = invariance_objective(losses, weights, lam=1.0, scale_aware=False)
    # group 2 has mass 0.25 < 0.5: skipped. L_0 = 3, L_1 = (1 + 2 + 4.5) / 1.75
    l1 = 7.5 / 1.75
    mean = (3 + l1) / 2
    var = ((3 - mean) ** 2 + (l1 - mean) ** 2)
    assert int(t.groups_present) == 2
    assert t.loss.item() == pytest.approx(mean + var)


def test_single_group_is_plain_mean_and_gradients_flow():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    losses = per_sample_loss(pred, torch.zeros(2, 2))
    assert losses.tolist() == [2.5, 0.0]
    t = invariance_objective(losses, torch.ones(2, 1), lam=10.0)
    assert t.loss.item() == pytest.approx(1.25) and t.penalty.item() == 0.0
    t.loss.backward()
    assert torch.allclose(pred.grad, torch.tensor([[0.5, 1.0], [0.0, 0.0]]))
