"""Group-relative advantages: each completion's reward against its group's mean, scaled by a std.

GRPO (DeepSeekMath, arXiv:2402.03300, eq. 3) with TRL's `scale_rewards`: "group" divides by the group's std,
"batch" by the whole batch's (Dr. GRPO's argument against per-group scaling, arXiv:2503.20783, made optional),
"none" keeps the centred reward. std is unbiased and `eps` is added to it, as in TRL.

NaN rewards (unscorable completions) are left out of every statistic and get advantage 0. Where this differs
from TRL: a group with a single valid reward has std 0 here (its member's advantage is 0), not NaN.
Advantages are constants for the policy gradient; no autograd graph is built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_fast.kernels import reference
from grpo_fast.kernels.backend import resolve_backend
from grpo_fast.kernels.checks import check_rewards

_SCALES = {"none": 0, "group": 1, "batch": 2}


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,
    advantages_ptr,
    batch_std_ptr,
    group_size,
    eps,
    SCALE: tl.constexpr,  # 0 none, 1 group, 2 batch
    BLOCK_SIZE: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_SIZE)
    in_group = offs < group_size
    r = tl.load(rewards_ptr + group * group_size + offs, mask=in_group, other=float("nan"))
    valid = r == r  # noqa: PLR0124 -- false only for NaN
    count = tl.sum(valid.to(tl.float32), axis=0)
    # statistics of r - shift, shift = the group's largest valid reward: exact zeros for an all-equal group,
    # and no cancellation when rewards sit far from 0 (shifted-data variance)
    shift = tl.max(tl.where(valid, r, -float("inf")), axis=0)
    shifted = tl.where(valid, r - shift, 0.0)
    centered = tl.where(valid, shifted - tl.sum(shifted, axis=0) / tl.maximum(count, 1.0), 0.0)
    adv = centered
    if SCALE == 1:
        var = tl.sum(centered * centered, axis=0) / tl.maximum(count - 1.0, 1.0)
        std = tl.where(count > 1.0, tl.sqrt(var), 0.0)
        adv = centered / (std + eps)
    if SCALE == 2:
        adv = centered / (tl.load(batch_std_ptr) + eps)
    tl.store(advantages_ptr + group * group_size + offs, adv, mask=in_group)


def _batch_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the valid rewards of the whole batch, 0 when fewer than two; a 1-element fp32 tensor."""
    valid = ~torch.isnan(rewards)
    count = valid.sum()
    centered = torch.where(valid, rewards.double() - torch.nanmean(rewards.double()), 0.0)
    var = centered.square().sum() / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), 0.0).float().reshape(1)


def _group_advantages_triton(rewards: torch.Tensor, group_size: int, scale: str, eps: float) -> torch.Tensor:
    advantages = torch.empty_like(rewards)
    batch_std = _batch_std(rewards) if scale == "batch" else rewards  # a placeholder pointer when unused
    # one program per group; a group (G completions, G <= a few hundred) fits one block
    _group_advantages_kernel[(rewards.numel() // group_size,)](
        rewards, advantages, batch_std, group_size, eps,
        SCALE=_SCALES[scale], BLOCK_SIZE=triton.next_power_of_2(group_size), num_warps=1,
    )
    return advantages


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages fp32 `[B]` from `rewards [B]` (B = prompts x group_size, a group's members contiguous), or from
    `rewards [B, K]` (K reward functions) summed with `weights [K]` first (NaN entries skipped; all-NaN rows are
    unscorable). `scale`: "group" | "batch" | "none". NaN rewards get advantage 0.
    """
    if resolve_backend(rewards.device) != "triton":
        # `[B]` rewards leave nothing to chunk: the torch backend is the plain formula itself
        return reference.group_advantages(rewards, group_size, scale, eps, weights=weights)
    rewards = check_rewards(rewards, group_size, scale, weights)
    return _group_advantages_triton(rewards, group_size, scale, eps)
