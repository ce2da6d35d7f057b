"""The plain, obviously-correct PyTorch formulas: one function per public op, same signature.

Tests and benchmarks import these and never re-type a formula. They materialize the full `[tokens, vocab]`
logits and use autograd for every gradient; the `torch` and `triton` backends must agree with them.
Formulas follow TRL's `GRPOTrainer` (`_compute_loss`, and `nanstd`-based advantages); the k3 KL estimator is
Schulman's "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import torch

from grpo_fast.kernels.checks import (
    check_fused_linear_args,
    check_grpo_args,
    check_logits,
    check_rewards,
    grpo_defaults,
    loss_normalizer,
    require_float,
)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged (tests use fp64 as the ground truth)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`log_softmax(logits / temperature)[targets]`. `logits [..., V]`, `targets [...]` -> fp32 `[...]`."""
    check_logits(logits, targets, temperature)
    logp = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of `softmax(logits / temperature)` in nats. `logits [..., V]` -> fp32 `[...]`."""
    probs = torch.softmax(_at_least_fp32(logits) / temperature, dim=-1)
    return torch.special.entr(probs).sum(-1)  # -p log p, with 0 where p = 0 (a masked, -inf logit)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` under `hidden @ weight.T + bias` (full logits). `chunk_size` is ignored here."""
    check_fused_linear_args(hidden, weight, targets, bias)
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [..., V], the memory the other backends avoid
    logp = selective_logprobs(logits, targets, temperature)
    if return_entropy:
        return logp, entropy_from_logits(logits, temperature)
    return logp


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(r - mean_group(r)) / (std + eps)`, NaN-aware. `rewards [B]` or `[B, K]` (+ `weights [K]`) -> fp32 `[B]`.

    std is unbiased (Bessel), over the group ("group") or the whole batch ("batch"); "none" skips the division.
    A NaN reward gets advantage 0 and is left out of every mean and std; a group (or batch) with fewer than two
    valid rewards has std 0.
    """
    rewards = check_rewards(rewards, group_size, scale, weights).double()  # fp64 statistics: exact for equal groups
    groups = rewards.view(-1, group_size)
    valid = ~torch.isnan(groups)
    mean = torch.nanmean(groups, dim=1, keepdim=True)
    centered = groups - mean

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
    return torch.where(valid, advantages, 0.0).view(-1).float()


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
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    delta: float | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's clipped, KL-regularized GRPO loss, term by term. `logp/old_logp/ref_logp/mask [B, T]`, `advantages [B]`.

    Returns the scalar loss and metrics (`kl`, `clip_ratio/{low,high,region}_mean`, and `entropy` when given).
    """
    require_float("logp", logp)
    check_grpo_args(logp.shape, old_logp, ref_logp, advantages, mask, beta, loss_type, importance_sampling_level)
    epsilon_high = grpo_defaults(epsilon_low, epsilon_high)
    logp = _at_least_fp32(logp)
    mask = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]

    log_ratio = logp - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    metrics: dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        diff = ref_logp.to(logp.dtype) - logp
        kl = torch.exp(diff) - diff - 1  # k3 estimator, >= 0
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1.0)).detach()

    per_token = per_token.expand_as(mask)
    norm = loss_normalizer(mask, loss_type, max_completion_length)  # [B, 1] or scalar
    loss = (per_token * mask / norm).sum()

    low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).to(logp.dtype)
    high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).to(logp.dtype)
    for name, flag in (("low", low), ("high", high), ("region", torch.maximum(low, high))):
        if importance_sampling_level == "sequence":  # one value per sequence, as TRL logs it
            value = flag.mean()
        else:
            value = (flag * mask).sum() / mask.sum().clamp(min=1.0)
        metrics[f"clip_ratio/{name}_mean"] = value.detach()
    if entropy is not None:
        metrics["entropy"] = ((entropy.to(logp.dtype) * mask).sum() / mask.sum().clamp(min=1.0)).detach()
    return loss, metrics


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    chunk_size: int | None = None,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full-logits lm_head, log-softmax gather, then `grpo_loss`. `hidden [B, T, D]`, `weight [V, D]`."""
    logp, entropy = fused_linear_logprobs(hidden, weight, targets, bias, temperature, return_entropy=True)
    return grpo_loss(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
        delta=delta,
        entropy=entropy.detach(),
    )
