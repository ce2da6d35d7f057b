"""Argument checks shared by every backend: bad input gets a ValueError that names the argument.

Checks read shapes and dtypes only (never values that would force a GPU sync), except `targets` range,
which is checked with one reduction because an out-of-range index would read out of bounds in a kernel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from grpo_fast.config import ImportanceSamplingLevel, LossType, MultiObjectiveAggregation, ScaleRewards, choices


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
    rewards: torch.Tensor,
    group_size: int,
    scale: ScaleRewards,
    weights: torch.Tensor | None,
    multi_objective_aggregation: MultiObjectiveAggregation,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return fp32 `rewards [B, K]` (a `[B]` input is K = 1) and fp32 `weights [K]` (ones by default)."""
    require_float("rewards", rewards)
    if scale not in choices(ScaleRewards):
        raise ValueError(f"scale must be one of {choices(ScaleRewards)}, got {scale!r}")
    if multi_objective_aggregation not in choices(MultiObjectiveAggregation):
        raise ValueError(f"multi_objective_aggregation must be one of {choices(MultiObjectiveAggregation)}, "
                         f"got {multi_objective_aggregation!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() == 1:
        if weights is not None:
            raise ValueError("weights are for [B, K] rewards (K reward functions); rewards here are [B]")
        rewards = rewards.unsqueeze(1)
    elif rewards.dim() != 2:
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if weights is None:
        weights = torch.ones(k, device=rewards.device)
    if weights.shape != (k,):
        raise ValueError(f"weights must have shape [K] = ({k},) for rewards [B, K], got {tuple(weights.shape)}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of rewards B ({rewards.shape[0]}): "
                         f"a group's {group_size} completions must be contiguous")
    return rewards.float().contiguous(), weights.float().to(rewards.device)


@dataclass(frozen=True)
class LossOptions:
    """The GRPO loss's scalar options under TRL's `GRPOConfig` names (their defaults sit in `grpo_loss`'s signature).
    `epsilon_high=None` means `epsilon_low`, as in TRL."""

    beta: float
    epsilon_low: float
    epsilon_high: float | None
    delta: float | None
    loss_type: LossType
    importance_sampling_level: ImportanceSamplingLevel
    max_completion_length: int | None
    use_bias_correction_kl: bool
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    off_policy_mask_threshold: float | None
    entropy_coef: float

    @property
    def clip_high(self) -> float:
        """The upper clip width: TRL's default `epsilon_high = epsilon_low` when not given."""
        return resolve_epsilon_high(self.epsilon_low, self.epsilon_high)

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


def check_grpo_args(
    shape: torch.Size,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: LossOptions,
    *,
    entropy: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    needs_entropy: bool = False,
) -> None:
    """`old_logp/ref_logp/mask/entropy/entropy_mask [B, T]` = `shape` (the log-probs'), `advantages [B]`; known
    loss_type and IS level; `ref_logp` given if beta != 0; dr_grpo's length (`max_completion_length`, default T)
    >= 1; SAPO's temperatures > 0; `entropy` given if `needs_entropy` (the log-prob-level loss with entropy_coef)."""
    if len(shape) != 2:
        raise ValueError(f"log-probs/targets must be [B, T], got shape {tuple(shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("entropy", entropy),
                    ("entropy_mask", entropy_mask)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like the log-probs")
    if advantages.shape != (shape[0],):
        raise ValueError(f"advantages must be [B] = ({shape[0]},), got {tuple(advantages.shape)}")
    if options.loss_type not in choices(LossType):
        raise ValueError(f"loss_type must be one of {choices(LossType)}, got {options.loss_type!r}")
    if options.importance_sampling_level not in choices(ImportanceSamplingLevel):
        raise ValueError(f"importance_sampling_level must be one of {choices(ImportanceSamplingLevel)}, "
                         f"got {options.importance_sampling_level!r}")
    if options.beta != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp is required when beta != 0 (beta={options.beta})")
    if options.loss_type == "dr_grpo":
        length = shape[1] if options.max_completion_length is None else options.max_completion_length
        if length < 1:
            raise ValueError(f"max_completion_length must be >= 1 for dr_grpo, got {length}")
    if options.loss_type == "sapo":
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(options, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(options, name)}")
    if needs_entropy and entropy is None:
        raise ValueError(f"entropy [B, T] is required when entropy_coef != 0 (entropy_coef={options.entropy_coef})")


def resolve_epsilon_high(epsilon_low: float, epsilon_high: float | None) -> float:
    """The upper clip width: TRL's default `epsilon_high = epsilon_low` when not given."""
    return epsilon_low if epsilon_high is None else epsilon_high
