"""The invariance objective: soft-weighted group means of per-sample losses, mean over the groups present in the
batch plus lambda times their variance (V-REx style), optionally scale-aware (squared coefficient of variation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_GROUP_MASS = 0.5  # a group counts as present in a batch when its summed soft weight reaches this


@dataclass(frozen=True)
class ObjectiveTerms:
    loss: torch.Tensor  # what is minimised
    mean: torch.Tensor  # mean over present groups of the group losses
    penalty: torch.Tensor  # the (scale-aware or raw) unbiased variance of the group losses
    groups_present: torch.Tensor  # number of groups that entered the mean


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all non-batch dims: [B,...] -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def group_losses(losses: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft group means L_g = sum_i w_ig l_i / sum_i w_ig and the batch mass sum_i w_ig of each group."""
    mass = weights.sum(dim=0)
    return (weights * losses[:, None]).sum(dim=0) / mass.clamp_min(1e-12), mass


def invariance_objective(losses: torch.Tensor, weights: torch.Tensor, lam: float,
                         scale_aware: bool = True) -> ObjectiveTerms:
    """loss = mean_g L_g + lam * Var_g(L_g) over groups with batch mass >= 0.5 (unbiased variance).

    scale_aware: the variance is taken of L_g / mean_g(L_g).detach() (squared coefficient of variation), so lam is
    unit-free; otherwise of the raw L_g (as the paper's code does). With one group present the penalty is 0.
    """
    g_loss, mass = group_losses(losses, weights)
    present = mass >= MIN_GROUP_MASS
    if not bool(present.any()):  # degenerate batch: fall back to the plain mean
        zero = losses.sum() * 0
        return ObjectiveTerms(losses.mean(), losses.mean(), zero, present.sum())
    kept = g_loss[present]
    mean = kept.mean()
    if kept.numel() < 2:
        penalty = kept.sum() * 0
    else:
        scaled = kept / mean.detach() if scale_aware else kept
        penalty = scaled.var(unbiased=True)
    return ObjectiveTerms(mean + lam * penalty, mean, penalty, present.sum())
