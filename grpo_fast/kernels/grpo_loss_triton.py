"""The Triton kernel of the GRPO loss's elementwise core (the formulas are in `grpo_loss`'s docstring).

Only the triton backend imports this module (from `grpo_loss.token_terms`), so that `import grpo_fast.kernels`
and the CPU path never import triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grpo_token_kernel(
    logp_ptr,
    liw_ptr,
    adv_ptr,
    wp_ptr,
    u_ptr,
    wk_ptr,
    ref_ptr,
    v_ptr,
    phi_ptr,
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
    tau_pos,
    tau_neg,
    SURROGATE: tl.constexpr,  # 0: clipped (grpo, bnpo, dapo, dr_grpo, luspo), 1: sapo, 2: cispo, 3: vespo
    HAS_DELTA: tl.constexpr,
    HAS_REF: tl.constexpr,  # the KL (metric) is computed
    HAS_KL_TERM: tl.constexpr,  # and enters the loss (beta != 0)
    HAS_KL_WEIGHT: tl.constexpr,  # the KL weight differs from the policy term's (a policy mask is set)
    KL_IS_WEIGHTED: tl.constexpr,  # use_bias_correction_kl
    HAS_SEQ_KL: tl.constexpr,  # ... at sequence level: the chain term v through the sequence's weight
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    valid = offs < n_tokens
    liw = tl.load(liw_ptr + offs, mask=valid, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0)
    wp = tl.load(wp_ptr + offs, mask=valid, other=0.0)

    ratio = tl.exp(liw)
    low = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    high = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    if SURROGATE == 0:
        u = tl.load(u_ptr + offs, mask=valid, other=0.0)
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
        loss = -wp * tl.minimum(l1, l2)
        dlogp = -u * adv * (sel1 * dc1 + (1.0 - sel1) * dc2)
        low = ((c1 < clip_low) & (adv < 0)).to(tl.float32)
        high = ((c1 > clip_high) & (adv > 0)).to(tl.float32)
    elif SURROGATE == 1:
        u = tl.load(u_ptr + offs, mask=valid, other=0.0)
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -wp * adv * gate * 4.0 / tau
        dlogp = -u * adv * 4.0 * gate * (1.0 - gate) * ratio
    else:  # a constant weight times the log-prob; for cispo clip_high is epsilon_high itself
        logp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
        if SURROGATE == 2:
            coef = tl.minimum(ratio, clip_high)
            high = ((ratio > clip_high) & (adv > 0)).to(tl.float32)
        else:
            coef = tl.load(phi_ptr + offs, mask=valid, other=0.0)
        dlogp = -wp * coef * adv
        loss = dlogp * logp

    if HAS_REF:
        logp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
        diff = tl.load(ref_ptr + offs, mask=valid, other=0.0) - logp
        ediff = tl.exp(diff)
        kl = ediff - diff - 1.0
        wk = wp
        if HAS_KL_WEIGHT:
            wk = tl.load(wk_ptr + offs, mask=valid, other=0.0)
        if KL_IS_WEIGHTED:
            if HAS_SEQ_KL:
                dkl = ratio * (wk * (1.0 - ediff) + tl.load(v_ptr + offs, mask=valid, other=0.0))
            else:  # d (kl r) / d logp with r = exp(logp - old): r (1 - e^diff + kl) = -r diff
                dkl = -wk * ratio * diff
            kl = kl * ratio
        else:
            dkl = wk * (1.0 - ediff)
        if HAS_KL_TERM:
            loss += beta * wk * kl
            dlogp += beta * dkl
        tl.store(kl_ptr + offs, kl, mask=valid)
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(dlogp_ptr + offs, dlogp, mask=valid)
    tl.store(low_ptr + offs, low, mask=valid)
    tl.store(high_ptr + offs, high, mask=valid)


def token_terms(
    logp: torch.Tensor, liw: torch.Tensor, inputs, options, surrogate: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Flat fp32 `[N]` `logp`, `liw`; `inputs` a `grpo_loss.TokenInputs` of the same rows, `options` the
    `checks.LossOptions`, `surrogate` the kernel's SURROGATE -> fp32 `[N]` weighted loss, d loss / d logp, KL
    (None without a reference) and the low / high clip flags."""
    n = logp.numel()
    loss, dlogp, kl, low, high = (torch.empty(n, device=logp.device, dtype=torch.float32) for _ in range(5))
    x, o = inputs, options
    has_ref = x.ref is not None
    clip_high = o.clip_high if surrogate == 2 else 1.0 + o.clip_high
    block = 1024  # elementwise: 1024 tokens over 4 warps is 8 per thread, enough to hide load latency
    _grpo_token_kernel[(triton.cdiv(n, block),)](
        logp, liw, x.adv, x.wp, x.u, x.wp if x.wk is None else x.wk, x.ref if has_ref else logp,
        logp if x.v is None else x.v, logp if x.phi is None else x.phi,  # placeholders where unused
        loss, dlogp, kl, low, high, n,
        o.beta, 1.0 - o.epsilon_low, clip_high, 0.0 if o.delta is None else o.delta,
        o.sapo_temperature_pos, o.sapo_temperature_neg,
        SURROGATE=surrogate, HAS_DELTA=o.delta is not None, HAS_REF=has_ref, HAS_KL_TERM=has_ref and o.beta != 0.0,
        HAS_KL_WEIGHT=x.wk is not None, KL_IS_WEIGHTED=o.use_bias_correction_kl, HAS_SEQ_KL=x.v is not None,
        BLOCK_SIZE=block, num_warps=4,
    )
    return loss, dlogp, kl if has_ref else None, low, high
