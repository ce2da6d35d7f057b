"""The GRPO loss on per-token log-probs, every variant of TRL's `GRPOTrainer._compute_loss`: value and
`d loss / d logp` in one pass.

Every loss type, importance-sampling level and option reduces to one elementwise form over the B*T tokens
(DeepSeekMath's GRPO, arXiv:2402.03300, with TRL's variants):

    r = exp(liw)                liw: log importance weight, token (logp - old) or sequence (its masked mean)
    surrogate_t, by loss type:
      clipped (grpo, bnpo, dapo, dr_grpo, luspo): -min(c1 A, c2 A), c1 = min(r, delta), c2 = clamp(r, 1 -+ eps)
      sapo (arXiv:2511.20347):  -A sigmoid(tau (r - 1)) 4 / tau,  tau = sapo_temperature_pos if A > 0 else _neg
      cispo (MiniMax-M1, arXiv:2506.13585): -sg[min(r, epsilon_high)] A logp   (sg: no gradient)
      vespo (arXiv:2602.10693): -sg[phi] A logp, phi the sequence's gamma weight (`reference.vespo_weights`)
    kl_t = exp(ref - logp) - (ref - logp) - 1 (k3), times r with use_bias_correction_kl (DeepSeek-V3.2)
    loss = sum_t wp_t surrogate_t + beta sum_t w_t kl_t - entropy_coef * (mean entropy over the kept tokens)

`w = mask / normalizer` carries the loss type; `wp = w` times the policy masks (`off_policy_mask_threshold`'s
sequence mask and the top-entropy token mask), which TRL applies to the surrogate alone. The gradient is
`d loss / d logp_t = u_t d surrogate / d liw + wp_t d surrogate / d logp + beta d (w kl) / d logp`, with `u = wp`
at token level and, at sequence level, `u_t = (sum_t' wp_t') mask_t / len`, the chain rule through the masked
mean; the bias-corrected KL at sequence level adds `beta r v_t`, `v_t = (sum_t' w_t' kl_t') mask_t / len`.
Whatever depends on a whole sequence (its mean log-ratio, v, VESPO's phi, the off-policy mask) is computed
before the pass (`plan_loss`), so the kernel needs no knowledge of sequences, which lets the fused lm_head path
run it on any chunk of tokens. The entropy bonus's gradient `d loss / d entropy_t` is a constant of the plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from grpo_fast.config import ImportanceSamplingLevel, LossType
from grpo_fast.kernels import reference
from grpo_fast.kernels.backend import resolve_backend
from grpo_fast.kernels.checks import LossOptions, check_grpo_args, require_float

CLIPPED = ("grpo", "bnpo", "dapo", "dr_grpo", "luspo")
# the Triton kernel's SURROGATE: 0 clipped, 1 sapo, 2 cispo, 3 vespo
SURROGATES = {**dict.fromkeys(CLIPPED, 0), "sapo": 1, "cispo": 2, "vespo": 3}


@dataclass
class TokenInputs:
    """What the elementwise core reads besides each token's log-prob and log importance weight: flat fp32 `[N]`
    (None: not used by these options)."""

    adv: torch.Tensor  # each token's sequence advantage
    wp: torch.Tensor  # the surrogate's weight: mask / normalizer, times the policy masks
    u: torch.Tensor  # the surrogate's chain weight through liw (see the module docstring)
    wk: torch.Tensor | None  # the KL's weight mask / normalizer; None: equal to wp (no policy mask)
    ref: torch.Tensor | None
    v: torch.Tensor | None  # sequence level, bias-corrected KL: (sum_t' w_t' kl_t') mask_t / len
    phi: torch.Tensor | None  # vespo: the sequence's gamma weight, per token

    def rows(self, rows: slice) -> TokenInputs:
        return TokenInputs(*(None if (t := getattr(self, name)) is None else t[rows] for name in _INPUT_FIELDS))


_INPUT_FIELDS = [f.name for f in dataclasses.fields(TokenInputs)]


@dataclass
class TokenTerms:
    """Per-token outputs, all fp32 `[N]`: weighted loss, d loss / d logp, KL (or None), clip flags."""

    loss: torch.Tensor
    dlogp: torch.Tensor | None
    kl: torch.Tensor | None
    low: torch.Tensor
    high: torch.Tensor


def _token_terms_torch(logp: torch.Tensor, liw: torch.Tensor, x: TokenInputs, o: LossOptions) -> TokenTerms:
    adv, ratio = x.adv, torch.exp(liw)
    low = high = torch.zeros_like(ratio)
    if o.loss_type in CLIPPED:
        clip_low, clip_high = 1.0 - o.epsilon_low, 1.0 + o.clip_high
        c1, dc1 = ratio, ratio
        if o.delta is not None:
            c1 = ratio.clamp(max=o.delta)
            dc1 = torch.where(ratio <= o.delta, ratio, 0.0)
        c2 = ratio.clamp(clip_low, clip_high)
        dc2 = torch.where((ratio >= clip_low) & (ratio <= clip_high), ratio, 0.0)
        l1, l2 = c1 * adv, c2 * adv
        sel1 = torch.where(l1 < l2, 1.0, torch.where(l1 == l2, 0.5, 0.0))
        loss = -x.wp * torch.minimum(l1, l2)
        dlogp = -x.u * adv * (sel1 * dc1 + (1.0 - sel1) * dc2)
        low = ((c1 < clip_low) & (adv < 0)).float()
        high = ((c1 > clip_high) & (adv > 0)).float()
    elif o.loss_type == "sapo":
        tau = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        gate = torch.sigmoid(tau * (ratio - 1.0))
        loss = -x.wp * adv * gate * 4.0 / tau
        dlogp = -x.u * adv * 4.0 * gate * (1.0 - gate) * ratio
    else:  # cispo, vespo: a constant weight times the log-prob
        if o.loss_type == "cispo":
            coef = ratio.clamp(max=o.clip_high)
            high = ((ratio > o.clip_high) & (adv > 0)).float()
        else:
            coef = x.phi
        dlogp = -x.wp * coef * adv
        loss = dlogp * logp
    kl = None
    if x.ref is not None:
        wk = x.wp if x.wk is None else x.wk
        diff = x.ref - logp
        ediff = torch.exp(diff)
        kl = ediff - diff - 1.0
        if o.use_bias_correction_kl:
            # d (kl r) / d logp with r = exp(logp - old): r (1 - e^diff + kl) = -r diff; at sequence level r is the
            # sequence's, and the chain through its mean adds r v
            dkl = -wk * ratio * diff if x.v is None else ratio * (wk * (1.0 - ediff) + x.v)
            kl = kl * ratio
        else:
            dkl = wk * (1.0 - ediff)
        if o.beta != 0.0:
            loss = loss + o.beta * wk * kl
            dlogp = dlogp + o.beta * dkl
    return TokenTerms(loss, dlogp, kl, low, high)


def flat_fp32(t: torch.Tensor) -> torch.Tensor:
    """`[B, T]` (or any shape) -> contiguous fp32 `[B * T]`."""
    return t.reshape(-1).float().contiguous()


def token_terms(
    backend: str, logp: torch.Tensor, liw: torch.Tensor, inputs: TokenInputs, options: LossOptions
) -> TokenTerms:
    """The elementwise core on flat fp32 `[N]` tensors (see the module docstring), on `backend`."""
    if backend == "triton":
        from grpo_fast.kernels import grpo_loss_triton  # imports triton: on first use only

        return TokenTerms(*grpo_loss_triton.token_terms(logp, liw, inputs, options, SURROGATES[options.loss_type]))
    return _token_terms_torch(logp, liw, inputs, options)


def loss_normalizer(mask: torch.Tensor, loss_type: LossType, max_completion_length: int | None) -> torch.Tensor:
    """What the masked per-token loss sum is divided by, for fp32 `mask [B, T]`: a tensor that broadcasts against it.

    grpo, sapo: B * (valid tokens of the sequence), i.e. mean per sequence then over sequences; bnpo, dapo, cispo,
    vespo: the valid tokens of the batch; dr_grpo: B * max_completion_length (default: T); luspo: B (each
    sequence's sum, then the mean over sequences).
    """
    b, t = mask.shape
    if loss_type in ("grpo", "sapo"):
        return mask.sum(-1, keepdim=True).clamp(min=1.0) * b
    if loss_type == "dr_grpo":
        length = t if max_completion_length is None else max_completion_length
        return torch.tensor(float(b * length), device=mask.device)
    if loss_type == "luspo":
        return torch.tensor(float(b), device=mask.device)
    return mask.sum().clamp(min=1.0)


def needs_sequence_logp(options: LossOptions, has_old: bool, has_ref: bool) -> bool:
    """Whether some token's gradient depends on the log-probs of the other tokens of its sequence, so that they must
    be known before the pass: sequence-level weights, VESPO's phi and the off-policy mask (all constant on-policy,
    when `old_logp` is None), and the bias-corrected KL at sequence level."""
    o = options
    whole_sequence = (o.importance_sampling_level == "sequence" or o.loss_type == "vespo"
                      or o.off_policy_mask_threshold is not None)
    sequence_kl = (o.importance_sampling_level == "sequence" and o.use_bias_correction_kl and o.beta != 0.0
                   and has_ref)
    return (has_old and whole_sequence) or sequence_kl


@dataclass
class LossPlan:
    """Everything known before the pass: the per-token inputs, metric weights and the entropy bonus's gradient."""

    tokens: TokenInputs
    old: torch.Tensor | None  # [N] old log-probs (token level)
    liw_seq: torch.Tensor | None  # [N] sequence-level log importance weights; None at token level
    mask: torch.Tensor  # [B, T] fp32
    metric: torch.Tensor  # [B, T] clip-ratio weights: masked token mean, or one value per sequence at sequence level
    phi: torch.Tensor | None  # [B] VESPO's weights, for the metric
    grad_entropy: torch.Tensor | None  # [N] d loss / d entropy, None without entropy_coef

    def log_weights(self, rows: slice, logp: torch.Tensor) -> torch.Tensor:
        """liw of rows `rows`, whose log-probs are `logp`."""
        if self.liw_seq is not None:
            return self.liw_seq[rows]
        return logp - self.old[rows] if self.old is not None else torch.zeros_like(logp)


def plan_loss(
    sequence_logp: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy_mask: torch.Tensor | None,
    options: LossOptions,
) -> LossPlan:
    """The plan for `[B, T]` inputs; `sequence_logp [B, T]` (no grad) must be given where `needs_sequence_logp`."""
    o = options
    mask = mask.float()
    b, _ = mask.shape
    w = mask / loss_normalizer(mask, o.loss_type, o.max_completion_length)
    per_seq = mask / mask.sum(-1, keepdim=True).clamp(min=1.0)  # d (masked mean) / d logp_t
    has_old = old_logp is not None
    log_ratio = None
    if has_old and needs_sequence_logp(o, has_old, ref_logp is not None):
        log_ratio = sequence_logp.float() - old_logp.float()
    zeros = torch.zeros_like(mask)

    policy_mask = None
    if o.off_policy_mask_threshold is not None:
        policy_mask = reference.off_policy_sequence_mask(advantages.float(), zeros if log_ratio is None else log_ratio,
                                                         mask, o.off_policy_mask_threshold)
    if entropy_mask is not None:
        policy_mask = entropy_mask.float() if policy_mask is None else policy_mask * entropy_mask.float()
    wp = w if policy_mask is None else w * policy_mask
    phi = None
    if o.loss_type == "vespo":
        phi = reference.vespo_weights(advantages.float(), zeros if log_ratio is None else log_ratio, mask,
                                      k_pos=o.vespo_k_pos, lambda_pos=o.vespo_lambda_pos, k_neg=o.vespo_k_neg,
                                      lambda_neg=o.vespo_lambda_neg)  # [B, 1]
    liw_seq = v = None
    if o.importance_sampling_level == "sequence":
        u = wp.sum(-1, keepdim=True) * per_seq
        liw_seq = mask.new_zeros(b, 1) if log_ratio is None else (
            (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
        if o.use_bias_correction_kl and o.beta != 0.0 and ref_logp is not None:
            diff = ref_logp.float() - sequence_logp.float()
            v = (w * (torch.exp(diff) - diff - 1.0)).sum(-1, keepdim=True) * per_seq
        metric = per_seq / b
    else:
        u = wp
        metric = mask / mask.sum().clamp(min=1.0)
    grad_entropy = None
    if o.entropy_coef != 0.0:
        active = mask if entropy_mask is None else mask * entropy_mask.float()
        grad_entropy = flat_fp32(-o.entropy_coef * active / active.sum().clamp(min=1.0))
    tokens = TokenInputs(
        adv=flat_fp32(advantages.float().unsqueeze(1).expand_as(mask)),
        wp=flat_fp32(wp),
        u=flat_fp32(u),
        wk=None if policy_mask is None else flat_fp32(w),
        ref=None if ref_logp is None else flat_fp32(ref_logp),
        v=None if v is None else flat_fp32(v),
        phi=None if phi is None else flat_fp32(phi.expand_as(mask)),
    )
    return LossPlan(
        tokens,
        old=None if old_logp is None else flat_fp32(old_logp),
        liw_seq=None if liw_seq is None else flat_fp32(liw_seq.expand_as(mask)),
        mask=mask,
        metric=metric,
        phi=None if phi is None else phi.view(-1),
        grad_entropy=grad_entropy,
    )


def loss_and_metrics(
    terms: list[TokenTerms], plan: LossPlan, options: LossOptions, entropy: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum the per-token terms (chunks in token order) into the scalar loss (with the entropy bonus when
    entropy_coef != 0) and TRL's metrics: `kl` and `entropy` as masked means, the loss type's clip ratios
    weighted by `plan.metric`, VESPO's mean phi, and `policy_loss` (the loss before the bonus)."""
    mask = plan.mask.reshape(-1)
    metric_weight = plan.metric.reshape(-1)
    loss = sum(t.loss.sum() for t in terms)
    metrics: dict[str, torch.Tensor] = {}
    count = mask.sum().clamp(min=1.0)
    if terms[0].kl is not None:
        metrics["kl"] = (torch.cat([t.kl for t in terms]) * mask).sum() / count
    if options.loss_type in CLIPPED:
        low, high = torch.cat([t.low for t in terms]), torch.cat([t.high for t in terms])
        metrics["clip_ratio/low_mean"] = (low * metric_weight).sum()
        metrics["clip_ratio/high_mean"] = (high * metric_weight).sum()
        metrics["clip_ratio/region_mean"] = (torch.maximum(low, high) * metric_weight).sum()
    elif options.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = (torch.cat([t.high for t in terms]) * metric_weight).sum()
    elif options.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = plan.phi.mean()
    if entropy is not None:
        entropy = entropy.reshape(-1).float()
        metrics["entropy"] = (entropy * mask).sum() / count
    if plan.grad_entropy is not None:
        metrics["policy_loss"] = loss
        loss = loss + (plan.grad_entropy * entropy).sum()
    return loss, {k: v.detach() for k, v in metrics.items()}


class _GRPOLoss(torch.autograd.Function):
    """Scalar loss from `logp [N]` (and `entropy [N]`); the gradients were computed with the value, backward only
    scales them."""

    @staticmethod
    def forward(ctx, logp, entropy, loss, dlogp, dentropy):
        ctx.save_for_backward(dlogp, dentropy)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dlogp, dentropy = ctx.saved_tensors
        return dlogp * grad_loss, None if dentropy is None else dentropy * grad_loss, None, None, None


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
    """GRPO's loss, every variant TRL offers (options under `GRPOConfig`'s names and defaults).
    `logp/old_logp/ref_logp/mask [B, T]`, `advantages [B]`; `entropy [B, T]` (the policy's, differentiable: needed
    for `entropy_coef`, else only the metric); `entropy_mask [B, T]` (the top-entropy tokens the surrogate acts on,
    see `high_entropy_mask`; None: all).

    `old_logp=None` means on-policy (ratio 1); `ref_logp` may be None when `beta == 0` (then no `kl` metric).
    Gradients flow to `logp` (and `entropy`). Returns `(loss, metrics)` with the numbers of TRL's
    `GRPOTrainer._compute_loss` (see `reference.grpo_loss` for the metric names).
    """
    options = LossOptions(
        beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level, max_completion_length,
        use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos,
        vespo_k_neg, vespo_lambda_neg, off_policy_mask_threshold, entropy_coef,
    )
    backend = resolve_backend(logp.device)
    if backend == "reference":
        return reference.grpo_loss(logp, old_logp, ref_logp, advantages, mask, **options.kwargs(), entropy=entropy,
                                   entropy_mask=entropy_mask)
    require_float("logp", logp)
    check_grpo_args(logp.shape, old_logp, ref_logp, advantages, mask, options, entropy=entropy,
                    entropy_mask=entropy_mask, needs_entropy=entropy_coef != 0.0)
    lp = logp.detach().float()
    plan = plan_loss(lp, old_logp, ref_logp, advantages, mask, entropy_mask, options)
    flat = flat_fp32(lp)
    terms = token_terms(backend, flat, plan.log_weights(slice(None), flat), plan.tokens, options)
    loss, metrics = loss_and_metrics([terms], plan, options, None if entropy is None else entropy.detach())
    dentropy = None if plan.grad_entropy is None else plan.grad_entropy.view(logp.shape).to(entropy.dtype)
    loss = _GRPOLoss.apply(logp, entropy, loss, terms.dlogp.view(logp.shape).to(logp.dtype), dentropy)
    return loss, metrics


def high_entropy_mask(
    entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """TRL's top-entropy token mask ("Beyond the 80/20 Rule", arXiv:2506.01939): the valid tokens of `mask [B, T]`
    whose `entropy [B, T]` is at least the `1 - top_entropy_quantile` quantile (linear interpolation) of `pool`, the
    valid tokens' entropies of the whole batch, every rank's (default: this `entropy[mask]`). -> bool `[B, T]`;
    all False when the pool is empty. Pass it as `entropy_mask`."""
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    valid = mask.bool()
    pool = entropy.detach()[valid].float() if pool is None else pool.float()
    if pool.numel() == 0:
        return torch.zeros_like(valid)
    threshold = torch.quantile(pool, 1.0 - top_entropy_quantile)
    return (entropy.detach().float() >= threshold) & valid
