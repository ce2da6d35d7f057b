"""The plain, obviously-correct PyTorch formulas: one function per public op, same signature.

Tests and benchmarks import these and never re-type a formula. They materialize the full `[tokens, vocab]`
logits and use autograd for every gradient; the `torch` and `triton` backends must agree with them.
Formulas follow TRL's `GRPOTrainer` (`_compute_loss`, and `nanstd`-based advantages); the k3 KL estimator is
Schulman's "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import math

import torch

from grpo_fast.config import ImportanceSamplingLevel, LossType, MultiObjectiveAggregation, ScaleRewards
from grpo_fast.kernels.checks import (
    LossOptions,
    check_fused_linear_args,
    check_grpo_args,
    check_logits,
    check_rewards,
    require_float,
)
from grpo_fast.kernels.lm_head import compute_dtype_of


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged (tests use fp64 as the ground truth)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """`log_softmax(logits / temperature)[targets]`. `logits [..., V]`, `targets [...]` -> fp32 `[...]`."""
    check_logits(logits, targets, temperature)
    logp = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of `softmax(logits / temperature)` in nats. `logits [..., V]` -> fp32 `[...]`.

    `-sum p log p` from the log-softmax, with `log p` replaced by 0 where p = 0 (a masked, -inf logit, or one that
    underflows, e.g. -80 beside +80): the term is 0 there, and so is its gradient, where `entr(softmax)` would
    backpropagate `0 * -log 0 = NaN`."""
    logp = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` under `hidden @ weight.T + bias` (full logits), the GEMM in `compute_dtype` (default:
    the narrower of hidden's and weight's dtypes). `chunk_size` is ignored here."""
    check_fused_linear_args(hidden, weight, targets, bias)
    dtype = compute_dtype_of(hidden, weight, compute_dtype)
    # [..., V], the memory the other backends avoid
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    logp = selective_logprobs(logits, targets, temperature=temperature)
    if return_entropy:
        return logp, entropy_from_logits(logits, temperature)
    return logp


def weighted_reward_sum(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`rewards [B, K]` weighted by `weights [K]` and summed over K, NaN entries skipped; a row with every entry NaN
    stays NaN (unscorable). -> `[B]`."""
    all_nan = torch.isnan(rewards).all(dim=1)
    return torch.where(all_nan, float("nan"), torch.nansum(rewards * weights.to(rewards.dtype), dim=1))


def _normalize(rewards: torch.Tensor, group_size: int, scale: ScaleRewards, eps: float) -> torch.Tensor:
    """`(r - mean_group(r)) / (std + eps)` of `rewards [B]` (NaN-aware, dtype kept); NaN rewards give 0."""
    groups = rewards.view(-1, group_size)
    valid = ~torch.isnan(groups)
    centered = groups - torch.nanmean(groups, dim=1, keepdim=True)

    def unbiased_std(x: torch.Tensor, ok: torch.Tensor, dim: int | None) -> torch.Tensor:
        count = ok.sum(dim=dim, keepdim=dim is not None)
        sq = torch.where(ok, x.square(), 0.0).sum(dim=dim, keepdim=dim is not None)
        return torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), 0.0)

    if scale == "group":
        advantages = centered / (unbiased_std(centered, valid, dim=1) + eps)
    elif scale == "batch":
        batch_centered = rewards - torch.nanmean(rewards)
        advantages = centered / (unbiased_std(batch_centered, ~torch.isnan(rewards), dim=None) + eps)
    else:
        advantages = centered
    return torch.where(valid, advantages, 0.0).view(-1)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: ScaleRewards = "group",
    eps: float = 1e-4,
    weights: torch.Tensor | None = None,
    multi_objective_aggregation: MultiObjectiveAggregation = "sum_then_normalize",
) -> torch.Tensor:
    """`(r - mean_group(r)) / (std + eps)`, NaN-aware. `rewards [B]` or `[B, K]` (+ `weights [K]`) -> fp32 `[B]`.

    std is unbiased (Bessel), over the group ("group") or the whole batch ("batch"); "none" skips the division.
    A NaN reward gets advantage 0 and is left out of every mean and std; a group (or batch) with fewer than two
    valid rewards has std 0. K reward functions: "sum_then_normalize" (TRL's default) sums the weighted rewards,
    then normalizes as `scale` says; "normalize_then_sum" (GDPO, arXiv:2601.05242) normalizes each function's rewards
    within its groups, sums them weighted, then normalizes the sum over the whole batch (`scale` unused, as in TRL).
    """
    rewards, weights = check_rewards(rewards, group_size, scale, weights, multi_objective_aggregation)
    rewards = rewards.double()  # fp64 statistics: exact for equal groups
    if multi_objective_aggregation == "sum_then_normalize":
        return _normalize(weighted_reward_sum(rewards, weights), group_size, scale, eps).float()
    per_function = torch.stack([_normalize(r, group_size, "group", eps) for r in rewards.t()], dim=1)
    unscorable = torch.isnan(rewards).all(dim=1)
    total = torch.where(unscorable, float("nan"), (per_function * weights.double()).sum(dim=1))
    return _normalize(total, total.numel(), "group", eps).float() if total.numel() else total.float()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the valid tokens of `mask [B, T]` (0 when none is valid)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType, max_completion_length: int | None
) -> torch.Tensor:
    """TRL's reduction of the per-token loss `[B, T]` (or `[B, 1]`, broadcast) over the valid tokens of `mask [B, T]`.

    grpo, sapo: each sequence's mean over its valid tokens, then the mean over the B sequences (a fully masked
    sequence counts as 0); bnpo, dapo, cispo, vespo: the sum over all valid tokens / their count; dr_grpo: the
    sum / (B * max_completion_length), T when not given; luspo: each sequence's sum, then the mean over the B
    sequences (a sequence weighs as much as it is long).
    """
    masked = per_token * mask
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        b, t = mask.shape
        return masked.sum() / (b * (t if max_completion_length is None else max_completion_length))
    if loss_type == "luspo":
        return masked.sum(-1).mean()
    return masked.sum() / mask.sum().clamp(min=1.0)


def off_policy_sequence_mask(
    advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv:2512.02556, eq. 9), TRL's `off_policy_mask_threshold`: keep a
    sequence unless its advantage is negative and its mean `old - logp` (the KL from the sampling policy, NaN read as
    0) over the valid tokens exceeds `threshold`. `advantages [B]`, `log_ratio = logp - old [B, T]` (no grad) ->
    `[B, 1]` of 1.0 (keep) and 0.0 (drop)."""
    mask = mask.to(log_ratio.dtype)
    kl = torch.nan_to_num(-log_ratio, nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages.unsqueeze(1) >= 0) | (mean_kl <= threshold)).to(log_ratio.dtype)


def vespo_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """VESPO's gamma weight of each sequence (arXiv:2602.10693), as TRL computes it: `phi(w) = e^lam w^k e^(-lam w)`
    (phi(1) = 1) in log space, w = exp of the sequence's summed (not averaged) `logp - old`, per-token log-ratios
    clamped to [-20, 20] and the sum to [log 1e-8, 20]; (k, lam) = (k_pos, lambda_pos) for A >= 0, else the _neg pair;
    lam >= 1e-4; non-finite phi -> 0. `advantages [B]`, `log_ratio [B, T]` (no grad) -> `[B, 1]`, a constant."""
    mask = mask.to(log_ratio.dtype)
    lower = math.log(1e-8)
    log_w = ((log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)).clamp(lower, 20.0)
    non_negative = advantages.unsqueeze(1) >= 0
    k = torch.where(non_negative, k_pos, k_neg).to(log_ratio.dtype)
    lam = torch.where(non_negative, lambda_pos, lambda_neg).to(log_ratio.dtype).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: LossType = "dapo",
    importance_sampling_level: ImportanceSamplingLevel = "token",
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's GRPO loss, term by term. `logp/old_logp/ref_logp/mask/entropy/entropy_mask [B, T]`, `advantages [B]`.

    Returns the scalar loss and TRL's metrics: `kl` when `ref_logp` is given; `clip_ratio/{low,high,region}_mean`
    (clipped loss types), `cispo_clip_ratio` or `vespo/phi_seq_mean`; `entropy` when `entropy` is given; and
    `policy_loss` (the loss before the entropy bonus) when `entropy_coef != 0`.
    """
    options = LossOptions(
        beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level, max_completion_length,
        use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos,
        vespo_k_neg, vespo_lambda_neg, off_policy_mask_threshold, entropy_coef,
    )
    require_float("logp", logp)
    check_grpo_args(logp.shape, old_logp, ref_logp, advantages, mask, options, entropy=entropy,
                    entropy_mask=entropy_mask, needs_entropy=entropy_coef != 0.0)
    epsilon_high = options.clip_high
    logp = _at_least_fp32(logp)
    mask = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]

    log_ratio = logp - old
    log_weight = log_ratio
    if importance_sampling_level == "sequence":
        log_weight = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    coef_1 = torch.exp(log_weight)
    metrics: dict[str, torch.Tensor] = {}
    kl = None
    if ref_logp is not None:
        diff = ref_logp.to(logp.dtype) - logp
        kl = torch.exp(diff) - diff - 1  # k3 estimator, >= 0
        if use_bias_correction_kl:
            kl = kl * coef_1  # importance-weighted: the unbiased reverse-KL gradient (DeepSeek-V3.2)
        metrics["kl"] = _masked_mean(kl, mask).detach()

    if loss_type == "cispo":  # MiniMax-M1 (arXiv:2506.13585): a clipped, detached IS weight times log-prob
        per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logp
        flags = {"cispo_clip_ratio": (coef_1 > epsilon_high) & (adv > 0)}
    elif loss_type == "sapo":  # arXiv:2511.20347: a sigmoid gate in place of the clip
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).to(logp.dtype)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
        flags = {}
    elif loss_type == "vespo":
        phi = vespo_weights(advantages.to(logp.dtype), log_ratio.detach(), mask, k_pos=vespo_k_pos,
                            lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
        per_token = -phi * adv * logp
        metrics["vespo/phi_seq_mean"] = phi.mean()
        flags = {}
    else:  # grpo, bnpo, dapo, dr_grpo, luspo: PPO's clipped surrogate
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
        low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + epsilon_high) & (adv > 0)
        flags = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}
    if off_policy_mask_threshold is not None:
        per_token = per_token * off_policy_sequence_mask(advantages.to(logp.dtype), log_ratio.detach(), mask,
                                                         off_policy_mask_threshold)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(logp.dtype)
    if beta != 0.0:
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length)

    for name, flag in flags.items():
        # one value per sequence at sequence level, as TRL logs it
        flag = flag.to(logp.dtype)
        value = flag.mean() if importance_sampling_level == "sequence" else _masked_mean(flag, mask)
        metrics[name] = value.detach()
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach().to(logp.dtype), mask)
    if entropy_coef != 0.0:
        # TRL's entropy bonus: the mean entropy over the tokens the policy term acts on, whatever the loss type
        active = mask if entropy_mask is None else mask * entropy_mask.to(logp.dtype)
        metrics["policy_loss"] = loss.detach()
        loss = loss - entropy_coef * _masked_mean(_at_least_fp32(entropy), active)
    return loss, {k: v.detach() for k, v in metrics.items()}


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: LossType = "dapo",
    importance_sampling_level: ImportanceSamplingLevel = "token",
    max_completion_length: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    entropy_coef: float = 0.0,
    entropy_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full-logits lm_head, log-softmax gather and entropy, then `grpo_loss` (the entropy, with its gradient, is the
    logits'). `hidden [B, T, D]`, `weight [V, D]`, `targets/old_logp/ref_logp/mask/entropy_mask [B, T]`,
    `advantages [B]`, `bias [V]`; the GEMM in `compute_dtype` as in `fused_linear_logprobs`. `chunk_size` is ignored
    here."""
    logp, entropy = fused_linear_logprobs(hidden, weight, targets, bias, temperature=temperature, return_entropy=True,
                                          compute_dtype=compute_dtype)
    return grpo_loss(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
        use_bias_correction_kl=use_bias_correction_kl,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        off_policy_mask_threshold=off_policy_mask_threshold,
        entropy_coef=entropy_coef,
        entropy=entropy,
        entropy_mask=entropy_mask,
    )
