"""The clipped, KL-regularized GRPO loss on per-token log-probs: value and `d loss / d logp` in one pass.

Every loss type and importance-sampling level reduces to one elementwise form over the B*T tokens
(DeepSeekMath's GRPO, arXiv:2402.03300, with TRL's clipping variants):

    r = exp(liw)                    liw: log importance weight, token (logp - old) or sequence (its masked mean)
    c1 = min(r, delta); c2 = clamp(r, 1 - eps_low, 1 + eps_high)
    surrogate = -min(c1 A, c2 A);   kl = exp(ref - logp) - (ref - logp) - 1   (k3)
    loss = sum_t w_t (surrogate_t + beta kl_t)
    d loss / d logp_t = u_t d surrogate / d liw + w_t beta (1 - exp(ref - logp))

`w = mask / normalizer` carries the loss type; `u = w` at token level, and at sequence level
`u_t = (sum_t' w_t') mask_t / len`, the chain rule through the masked mean. The kernel therefore needs no
knowledge of sequences, which lets the fused lm_head path run it on any chunk of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from grpo_fast.kernels import reference
from grpo_fast.kernels.backend import resolve_backend
from grpo_fast.kernels.checks import check_grpo_args, grpo_defaults, loss_normalizer, require_float


@triton.jit
def _grpo_token_kernel(
    logp_ptr,
    liw_ptr,
    adv_ptr,
    w_ptr,
    u_ptr,
    ref_ptr,
    loss_ptr,
    dlogp_ptr,
    kl_ptr,
    low_ptr,
    high_ptr,
    n_tokens,
    beta,
    clip_low,
    clip_high,
    delta,
    HAS_REF: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    valid = offs < n_tokens
    liw = tl.load(liw_ptr + offs, mask=valid, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    u = tl.load(u_ptr + offs, mask=valid, other=0.0)

    ratio = tl.exp(liw)
    c1 = ratio
    dc1 = ratio
    if HAS_DELTA:  # two-sided clipping caps the unclipped branch too
        c1 = tl.minimum(ratio, delta)
        dc1 = tl.where(ratio <= delta, ratio, 0.0)
    c2 = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    dc2 = tl.where((ratio >= clip_low) & (ratio <= clip_high), ratio, 0.0)
    l1 = c1 * adv
    l2 = c2 * adv
    # d min(l1, l2): to the smaller branch, split evenly on a tie (as torch.min's backward does)
    sel1 = tl.where(l1 < l2, 1.0, tl.where(l1 == l2, 0.5, 0.0))
    surrogate = -tl.minimum(l1, l2)
    dsurrogate = -adv * (sel1 * dc1 + (1.0 - sel1) * dc2)

    per_token = surrogate
    dlogp = u * dsurrogate
    if HAS_REF:
        logp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
        diff = tl.load(ref_ptr + offs, mask=valid, other=0.0) - logp
        ediff = tl.exp(diff)
        kl = ediff - diff - 1.0
        per_token += beta * kl
        dlogp += w * beta * (1.0 - ediff)
        tl.store(kl_ptr + offs, kl, mask=valid)
    tl.store(loss_ptr + offs, w * per_token, mask=valid)
    tl.store(dlogp_ptr + offs, dlogp, mask=valid)
    tl.store(low_ptr + offs, ((c1 < clip_low) & (adv < 0)).to(tl.float32), mask=valid)
    tl.store(high_ptr + offs, ((c1 > clip_high) & (adv > 0)).to(tl.float32), mask=valid)


@dataclass(frozen=True)
class GRPOParams:
    """Scalar knobs of the loss (TRL's names); `epsilon_high` already defaulted."""

    beta: float
    epsilon_low: float
    epsilon_high: float
    delta: float | None


@dataclass
class TokenTerms:
    """Per-token outputs, all fp32 `[N]`: weighted loss, d loss / d logp, k3 KL (or None), clip flags."""

    loss: torch.Tensor
    dlogp: torch.Tensor
    kl: torch.Tensor | None
    low: torch.Tensor
    high: torch.Tensor


def _token_terms_triton(logp, liw, adv, w, u, ref, p: GRPOParams) -> TokenTerms:
    n = logp.numel()
    out = [torch.empty(n, device=logp.device, dtype=torch.float32) for _ in range(5)]
    loss, dlogp, kl, low, high = out
    block = 1024  # elementwise: 1024 tokens over 4 warps is 8 per thread, enough to hide load latency
    _grpo_token_kernel[(triton.cdiv(n, block),)](
        logp, liw, adv, w, u, logp if ref is None else ref, loss, dlogp, kl, low, high, n,
        p.beta, 1.0 - p.epsilon_low, 1.0 + p.epsilon_high, 0.0 if p.delta is None else p.delta,
        HAS_REF=ref is not None, HAS_DELTA=p.delta is not None, BLOCK_SIZE=block, num_warps=4,
    )
    return TokenTerms(loss, dlogp, kl if ref is not None else None, low, high)


def _token_terms_torch(logp, liw, adv, w, u, ref, p: GRPOParams) -> TokenTerms:
    clip_low, clip_high = 1.0 - p.epsilon_low, 1.0 + p.epsilon_high
    ratio = torch.exp(liw)
    c1, dc1 = ratio, ratio
    if p.delta is not None:
        c1 = ratio.clamp(max=p.delta)
        dc1 = torch.where(ratio <= p.delta, ratio, 0.0)
    c2 = ratio.clamp(clip_low, clip_high)
    dc2 = torch.where((ratio >= clip_low) & (ratio <= clip_high), ratio, 0.0)
    l1, l2 = c1 * adv, c2 * adv
    sel1 = torch.where(l1 < l2, 1.0, torch.where(l1 == l2, 0.5, 0.0))
    per_token = -torch.minimum(l1, l2)
    dlogp = u * (-adv * (sel1 * dc1 + (1.0 - sel1) * dc2))
    kl = None
    if ref is not None:
        diff = ref - logp
        ediff = torch.exp(diff)
        kl = ediff - diff - 1.0
        per_token = per_token + p.beta * kl
        dlogp = dlogp + w * p.beta * (1.0 - ediff)
    low = ((c1 < clip_low) & (adv < 0)).float()
    high = ((c1 > clip_high) & (adv > 0)).float()
    return TokenTerms(w * per_token, dlogp, kl, low, high)


def flat_fp32(t: torch.Tensor) -> torch.Tensor:
    """`[B, T]` (or any shape) -> contiguous fp32 `[B * T]`."""
    return t.reshape(-1).float().contiguous()


def token_terms(
    backend: str,
    logp: torch.Tensor,
    liw: torch.Tensor,
    adv: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    ref: torch.Tensor | None,
    params: GRPOParams,
) -> TokenTerms:
    """The elementwise core on flat fp32 `[N]` tensors (see the module docstring), on `backend`."""
    impl = _token_terms_triton if backend == "triton" else _token_terms_torch
    return impl(logp, liw, adv, w, u, ref, params)


@dataclass
class Weights:
    """Per-token loss weights, fp32 `[B, T]`: `w` (value), `u` (surrogate gradient), `metric` (clip-ratio mean)."""

    w: torch.Tensor
    u: torch.Tensor
    metric: torch.Tensor


def token_weights(
    mask: torch.Tensor, loss_type: str, importance_sampling_level: str, max_completion_length: int | None
) -> Weights:
    """`w = mask / normalizer(loss_type)`; `u` and the clip-metric weights by importance-sampling level.

    Clip ratios are masked token means at token level; at sequence level TRL logs one value per sequence, so each
    sequence's tokens share weight 1 / (B * len).
    """
    mask = mask.float()
    w = mask / loss_normalizer(mask, loss_type, max_completion_length)
    if importance_sampling_level == "token":
        return Weights(w, w, mask / mask.sum().clamp(min=1.0))
    per_seq = mask / mask.sum(-1, keepdim=True).clamp(min=1.0)  # d(masked mean)/d logp_t
    return Weights(w, w.sum(-1, keepdim=True) * per_seq, per_seq / mask.shape[0])


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of `logp - old_logp` per sequence, broadcast to `[B, T]` (zeros when on-policy)."""
    if old_logp is None:
        return torch.zeros_like(logp, dtype=torch.float32)
    mask = mask.float()
    lr = ((logp.float() - old_logp.float()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return lr.expand_as(mask)


def summarize(
    terms: list[TokenTerms], mask: torch.Tensor, metric_weight: torch.Tensor, entropy: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and TRL's metrics from per-token terms (chunks concatenated in token order)."""
    mask = mask.reshape(-1).float()
    metric_weight = metric_weight.reshape(-1)
    loss = sum(t.loss.sum() for t in terms)
    metrics: dict[str, torch.Tensor] = {}
    count = mask.sum().clamp(min=1.0)
    if terms[0].kl is not None:
        metrics["kl"] = (torch.cat([t.kl for t in terms]) * mask).sum() / count
    low, high = torch.cat([t.low for t in terms]), torch.cat([t.high for t in terms])
    metrics["clip_ratio/low_mean"] = (low * metric_weight).sum()
    metrics["clip_ratio/high_mean"] = (high * metric_weight).sum()
    metrics["clip_ratio/region_mean"] = (torch.maximum(low, high) * metric_weight).sum()
    if entropy is not None:
        metrics["entropy"] = (entropy.reshape(-1).float() * mask).sum() / count
    return loss, {k: v.detach() for k, v in metrics.items()}


class _GRPOLoss(torch.autograd.Function):
    """Scalar loss from `logp [N]`; the gradient was computed with the value, backward only scales it."""

    @staticmethod
    def forward(ctx, logp: torch.Tensor, loss: torch.Tensor, dlogp: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(dlogp)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (dlogp,) = ctx.saved_tensors
        return dlogp * grad_loss, None, None


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
    """GRPO's clipped, KL-regularized loss. `logp/old_logp/ref_logp/mask [B, T]`, `advantages [B]`.

    `old_logp=None` means on-policy (ratio 1); `ref_logp` may be None when `beta == 0` (then no `kl` metric).
    `entropy [B, T]` (optional) only feeds the `entropy` metric. Gradients flow to `logp` alone.
    Returns `(loss, metrics)` with the numbers of TRL's `GRPOTrainer._compute_loss`.
    """
    backend = resolve_backend(logp.device)
    if backend == "reference":
        return reference.grpo_loss(
            logp, old_logp, ref_logp, advantages, mask, beta=beta, epsilon_low=epsilon_low,
            epsilon_high=epsilon_high, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length, delta=delta, entropy=entropy,
        )
    require_float("logp", logp)
    check_grpo_args(logp.shape, old_logp, ref_logp, advantages, mask, beta, loss_type, importance_sampling_level)
    params = GRPOParams(beta, epsilon_low, grpo_defaults(epsilon_low, epsilon_high), delta)
    weights = token_weights(mask, loss_type, importance_sampling_level, max_completion_length)
    lp = logp.detach().float()
    if importance_sampling_level == "sequence":
        liw = sequence_log_ratio(lp, old_logp, mask)
    else:
        liw = lp - old_logp.float() if old_logp is not None else torch.zeros_like(lp)
    terms = token_terms(
        backend, flat_fp32(lp), flat_fp32(liw), flat_fp32(advantages.unsqueeze(1).expand_as(lp)),
        flat_fp32(weights.w), flat_fp32(weights.u), None if ref_logp is None else flat_fp32(ref_logp), params,
    )
    loss, metrics = summarize([terms], mask, weights.metric, entropy)
    loss = _GRPOLoss.apply(logp, loss, terms.dlogp.view(logp.shape).to(logp.dtype))
    return loss, metrics
