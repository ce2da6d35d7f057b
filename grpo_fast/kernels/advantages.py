"""Group-relative advantages: each completion's reward against its group's mean, scaled by a std.

GRPO (DeepSeekMath, arXiv:2402.03300, eq. 3) with TRL's `scale_rewards`: "group" divides by the group's std,
"batch" by the whole batch's (Dr. GRPO's argument against per-group scaling, arXiv:2503.20783, made optional),
"none" keeps the centred reward. std is unbiased and `eps` is added to it, as in TRL.

NaN rewards (unscorable completions) are left out of every statistic and get advantage 0. Where this differs
from TRL: a group with a single valid reward has std 0 here (its member's advantage is 0), not NaN.
Advantages are constants for the policy gradient; no autograd graph is built.

The triton and torch backends share one fp32 algorithm (the kernel is in `advantages_triton`): statistics of the
rewards shifted by the group's largest valid reward, which gives exact zeros for an all-equal group and no
cancellation when rewards sit far from 0. The reference computes the plain formula in fp64.
"""

from __future__ import annotations

import torch

from grpo_fast.config import MultiObjectiveAggregation, ScaleRewards
from grpo_fast.kernels import reference
from grpo_fast.kernels.backend import resolve_backend
from grpo_fast.kernels.checks import check_rewards


def _batch_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the valid rewards of the whole batch, 0 when fewer than two; a 1-element fp32 tensor."""
    valid = ~torch.isnan(rewards)
    count = valid.sum()
    centered = torch.where(valid, rewards.double() - torch.nanmean(rewards.double()), 0.0)
    var = centered.square().sum() / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), 0.0).float().reshape(1)


def _group_advantages_torch(
    rewards: torch.Tensor, group_size: int, scale: ScaleRewards, eps: float, batch_std: torch.Tensor | None
) -> torch.Tensor:
    """The kernel's algorithm in torch ops, all groups at once: fp32 `rewards [B]` -> fp32 `[B]`."""
    groups = rewards.view(-1, group_size)
    valid = ~torch.isnan(groups)
    count = valid.sum(1, keepdim=True).float()
    shift = torch.where(valid, groups, -float("inf")).amax(1, keepdim=True)
    shifted = torch.where(valid, groups - shift, 0.0)
    centered = torch.where(valid, shifted - shifted.sum(1, keepdim=True) / count.clamp(min=1.0), 0.0)
    if scale == "group":
        var = centered.square().sum(1, keepdim=True) / (count - 1.0).clamp(min=1.0)
        centered = centered / (torch.where(count > 1.0, var.sqrt(), 0.0) + eps)
    elif scale == "batch":
        centered = centered / (batch_std + eps)
    return centered.view(-1)


def _normalize(backend: str, rewards: torch.Tensor, group_size: int, scale: ScaleRewards, eps: float) -> torch.Tensor:
    """fp32 `rewards [B]` -> fp32 advantages `[B]` on `backend` ("triton" or "torch")."""
    batch_std = _batch_std(rewards) if scale == "batch" else None
    if backend == "triton":
        from grpo_fast.kernels import advantages_triton  # imports triton: on first use only

        return advantages_triton.group_advantages(rewards, group_size, scale, eps, batch_std)
    return _group_advantages_torch(rewards, group_size, scale, eps, batch_std)


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: ScaleRewards = "group",
    eps: float = 1e-4,
    weights: torch.Tensor | None = None,
    multi_objective_aggregation: MultiObjectiveAggregation = "sum_then_normalize",
) -> torch.Tensor:
    """Advantages fp32 `[B]` from `rewards [B]` (B = prompts x group_size, a group's members contiguous), or from
    `rewards [B, K]` (K reward functions) with `weights [K]` (NaN entries skipped; all-NaN rows are unscorable).
    `scale`: "group" | "batch" | "none". NaN rewards get advantage 0. Runs on the rewards' device.
    `multi_objective_aggregation` (TRL's): "sum_then_normalize" sums the weighted rewards, then normalizes them as
    `scale` says; "normalize_then_sum" (GDPO, arXiv:2601.05242) normalizes each function's rewards within their
    groups, then the weighted sum over the whole batch (`scale` unused, as in TRL).
    """
    backend = resolve_backend(rewards.device)
    if backend == "reference":
        return reference.group_advantages(rewards, group_size, scale=scale, eps=eps, weights=weights,
                                          multi_objective_aggregation=multi_objective_aggregation)
    rewards, weights = check_rewards(rewards, group_size, scale, weights, multi_objective_aggregation)
    if multi_objective_aggregation == "sum_then_normalize":
        return _normalize(backend, reference.weighted_reward_sum(rewards, weights), group_size, scale, eps)
    b, k = rewards.shape
    if b == 0:
        return rewards.new_zeros(0)
    # each function's groups in one call: the [K, B] transpose holds K * B / G groups of G contiguous rewards
    per_function = _normalize(backend, rewards.t().contiguous().view(-1), group_size, "group", eps).view(k, b).t()
    total = torch.where(torch.isnan(rewards).all(dim=1), float("nan"), (per_function * weights).sum(dim=1))
    return _normalize(backend, total.contiguous(), b, "group", eps)  # the batch as one group
