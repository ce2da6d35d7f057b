"""The Triton kernel of `group_advantages`: one program per group (the algorithm is in `advantages`).

Only the triton backend imports this module, so that `import grpo_fast.kernels` never imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,
    advantages_ptr,
    batch_std_ptr,
    group_size,
    eps,
    SCALE_BY_GROUP: tl.constexpr,  # divide by the group's std ("group")
    SCALE_BY_BATCH: tl.constexpr,  # divide by the batch's std ("batch"); neither: "none"
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
    if SCALE_BY_GROUP:
        var = tl.sum(centered * centered, axis=0) / tl.maximum(count - 1.0, 1.0)
        std = tl.where(count > 1.0, tl.sqrt(var), 0.0)
        adv = centered / (std + eps)
    if SCALE_BY_BATCH:
        adv = centered / (tl.load(batch_std_ptr) + eps)
    tl.store(advantages_ptr + group * group_size + offs, adv, mask=in_group)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str, eps: float, batch_std: torch.Tensor | None
) -> torch.Tensor:
    """fp32 `rewards [B]` (checked), `batch_std [1]` when scale is "batch" -> fp32 advantages `[B]`."""
    advantages = torch.empty_like(rewards)
    # one program per group; a group (G completions, G <= a few hundred) fits one block
    _group_advantages_kernel[(rewards.numel() // group_size,)](
        rewards, advantages, rewards if batch_std is None else batch_std, group_size, eps,  # a placeholder pointer
        SCALE_BY_GROUP=scale == "group", SCALE_BY_BATCH=scale == "batch",
        BLOCK_SIZE=triton.next_power_of_2(group_size), num_warps=1,
    )
    return advantages
