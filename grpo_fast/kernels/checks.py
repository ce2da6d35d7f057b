"""Argument checks shared by every backend: bad input gets a ValueError that names the argument.

Checks read shapes and dtypes only (never values that would force a GPU sync), except `targets` range,
which is checked with one reduction because an out-of-range index would read out of bounds in a kernel.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IS_LEVELS = ("token", "sequence")
SCALES = ("group", "batch", "none")


def require_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (fp32 or bf16), got dtype {t.dtype}")


def check_targets(targets: torch.Tensor, shape: torch.Size, vocab: int) -> None:
    """`targets` must be integer, shaped like the logits' leading dims, with ids in `[0, vocab)`."""
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if targets.shape != shape:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}, expected {tuple(shape)} (the logits' leading dims)"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets out of range: ids must lie in [0, {vocab}), got [{int(targets.min())}, "
                         f"{int(targets.max())}]")


def check_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    require_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocab dim, got shape {tuple(logits.shape)}")
    check_temperature(temperature)
    check_targets(targets, logits.shape[:-1], logits.shape[-1])


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_fused_linear_args(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """`hidden [..., D]`, `weight [V, D]`, `targets [...]`, `bias [V]` or None."""
    require_float("hidden", hidden)
    require_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be the lm_head matrix [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim ({tuple(hidden.shape)}) must equal weight's D ({weight.shape[1]})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_targets(targets, hidden.shape[:-1], weight.shape[0])


def check_rewards(
    rewards: torch.Tensor, group_size: int, scale: str, weights: torch.Tensor | None
) -> torch.Tensor:
    """Validate and reduce rewards to fp32 `[B]`: `[B, K]` rows are weighted and summed (NaN entries skipped;
    a row with every entry NaN stays NaN, i.e. unscorable)."""
    require_float("rewards", rewards)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() == 2:
        k = rewards.shape[1]
        if weights is None:
            weights = torch.ones(k, device=rewards.device)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape [K] = ({k},) for rewards [B, K], got {tuple(weights.shape)}")
        r = rewards.float()
        all_nan = torch.isnan(r).all(dim=1)
        rewards = torch.where(all_nan, float("nan"), torch.nansum(r * weights.float(), dim=1))
    elif rewards.dim() != 1:
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(rewards.shape)}")
    elif weights is not None:
        raise ValueError("weights are for [B, K] rewards (K reward functions); rewards here are [B]")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of rewards B ({rewards.shape[0]}): "
                         f"a group's {group_size} completions must be contiguous")
    return rewards.float().contiguous()


def check_grpo_args(
    shape: torch.Size,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    loss_type: str,
    importance_sampling_level: str,
) -> None:
    """`old_logp/ref_logp/mask [B, T]` = `shape` (the log-probs'), `advantages [B]`; known loss_type and IS level;
    `ref_logp` given if beta != 0."""
    if len(shape) != 2:
        raise ValueError(f"log-probs/targets must be [B, T], got shape {tuple(shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like the log-probs")
    if advantages.shape != (shape[0],):
        raise ValueError(f"advantages must be [B] = ({shape[0]},), got {tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp is required when beta != 0 (beta={beta})")


def grpo_defaults(epsilon_low: float, epsilon_high: float | None) -> float:
    """TRL's default: `epsilon_high = epsilon_low` when not given."""
    return epsilon_low if epsilon_high is None else epsilon_high


def loss_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length: int | None) -> torch.Tensor:
    """What the masked per-token loss sum is divided by, as a tensor that broadcasts against `mask [B, T]`.

    grpo: B * (valid tokens of the sequence), i.e. mean per sequence then over sequences;
    bnpo/dapo: the valid tokens of the batch; dr_grpo: B * max_completion_length (default: T).
    """
    mask = mask.float()
    b, t = mask.shape
    if loss_type == "grpo":
        return mask.sum(-1, keepdim=True).clamp(min=1.0) * b
    if loss_type == "dr_grpo":
        length = t if max_completion_length is None else max_completion_length
        if length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {length}")
        return torch.tensor(float(b * length), device=mask.device)
    return mask.sum().clamp(min=1.0)
