"""lm_head + log-probs (and the GRPO loss) over row chunks, never holding more than one chunk of logits.

Per chunk of C token rows: `logits [C, V] = hidden_c @ weight.T + bias` (one GEMM: cuBLAS / BLAS), the row
kernels turn it into log-probs and then, in place, into `d logits`, and two GEMMs give the chunk's share of
`d hidden` and `d weight`. In `fused_linear_grpo_loss` the loss gradient of each token is known as soon as its
log-prob is (see `grpo_loss`; the entropy bonus's gradient is a constant), so value and gradients come out of a
single pass: three GEMMs in all, the same
as the full-logits path, with the `[N, V]` logits replaced by one `[C, V]` buffer (the approach of Liger's
fused linear cross-entropy, here with the GRPO loss in the middle). The GEMMs run in `compute_dtype` (default: the
narrower of hidden's and weight's dtypes), with `d weight` accumulated in fp32 (see `lm_head`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from grpo_fast.config import ImportanceSamplingLevel, LossType
from grpo_fast.kernels import reference
from grpo_fast.kernels.backend import resolve_backend, row_ops
from grpo_fast.kernels.checks import LossOptions, check_fused_linear_args, check_grpo_args, check_temperature
from grpo_fast.kernels.grpo_loss import (
    LossPlan,
    TokenTerms,
    loss_and_metrics,
    needs_sequence_logp,
    plan_loss,
    token_terms,
)
from grpo_fast.kernels.lm_head import GradBuffers, LmHead, compute_dtype_of, incoming_scale

_MIN_CHUNK_BYTES = 64 << 20


def default_chunk_rows(vocab: int, hidden_dim: int, itemsize: int = 4) -> int:
    """Rows per chunk, from V and D.

    Memory: the chunk's logits `[C, V]` cost C / D of the weight gradient `[V, D]` that the backward must hold
    anyway, so C ~ D / 4 bounds the extra at about a quarter of it. Speed: C is rounded up to a multiple of 128,
    the GEMM tile granularity (measured at D = 896, V = 151,936 on CPU BLAS: 224 rows 1.22x the three-GEMM
    floor, 256 rows 1.15x; 256 rows of logits are 156 MB, 29% of the 544 MB weight gradient). When V is small,
    the chunk grows to at least 64 MiB of logits so that tiny vocabularies are not cut into thousands of launches.
    """
    rows = max(-(-(hidden_dim // 4) // 128) * 128, _MIN_CHUNK_BYTES // (vocab * itemsize) // 128 * 128)
    return max(128, rows)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, return_entropy, backend, dtype):
        row_kernels = row_ops(backend)
        n = hidden.shape[0]
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        for start, end, logits in LmHead(weight, bias, dtype, chunk_rows).chunks(hidden):
            lp, ls, ent = row_kernels.row_stats(logits, targets[start:end], temperature, return_entropy)
            logp[start:end], lse[start:end] = lp, ls
            if entropy is not None:
                entropy[start:end] = ent
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.backend, ctx.dtype = temperature, chunk_rows, backend, dtype
        ctx.set_materialize_grads(False)
        if entropy is None:
            return logp, None
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        row_kernels = row_ops(ctx.backend)
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        grads = GradBuffers(hidden, weight, bias, ctx.needs_input_grad[:3])
        head = LmHead(weight, bias, ctx.dtype, ctx.chunk_rows)
        for start, end, logits in head.chunks(hidden):
            row_kernels.row_grad(
                logits, targets[start:end], lse[start:end], grad_logp[start:end],
                None if grad_entropy is None else grad_entropy[start:end],
                None if grad_entropy is None else entropy[start:end], ctx.temperature, out=logits,
            )
            grads.add_chunk(start, end, logits, hidden, head)
        return (*grads.result(None), None, None, None, None, None, None)


def _flatten(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).contiguous()


def _resolve_chunk(chunk_size: int | None, weight: torch.Tensor, dtype: torch.dtype) -> int:
    if chunk_size is None:
        return default_chunk_rows(weight.shape[0], weight.shape[1], dtype.itemsize)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return chunk_size


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
    """Log-probs of `targets` under the lm_head, chunk by chunk. `hidden [..., D]`, `weight [V, D]` (the lm_head),
    `targets [...]`, `bias [V]` -> fp32 `logp [...]` (and `entropy [...]`, nats). `chunk_size`: rows per chunk
    (default from V and D, see `default_chunk_rows`). `compute_dtype`: the GEMMs' dtype (default: the narrower of
    hidden's and weight's; `torch.bfloat16` on an fp32 master weight runs bf16 GEMMs, `d weight` stays fp32).
    Gradients flow to hidden, weight and bias, in their dtypes.
    """
    backend = resolve_backend(hidden.device)
    if backend == "reference":
        return reference.fused_linear_logprobs(
            hidden, weight, targets, bias, temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy,
            compute_dtype=compute_dtype,
        )
    check_fused_linear_args(hidden, weight, targets, bias)
    check_temperature(temperature)
    h, t = _flatten(hidden, targets)
    dtype = compute_dtype_of(hidden, weight, compute_dtype)
    logp, entropy = _FusedLinearLogprobs.apply(
        h, weight, bias, t, temperature, _resolve_chunk(chunk_size, weight, dtype), return_entropy, backend, dtype
    )
    if return_entropy:
        return logp.view(targets.shape), entropy.view(targets.shape)
    return logp.view(targets.shape)


class _FusedLinearGRPOLoss(torch.autograd.Function):
    """Loss value and all three gradients in the forward (one pass, three GEMMs); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, grads: GradBuffers):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # no reference may stay behind: autograd then adopts the buffers
        if grads is None:
            raise RuntimeError(
                "fused_linear_grpo_loss hands its gradients over in the first backward, so a second backward through "
                "the same loss (retain_graph=True) is not supported: compute the loss again for another backward"
            )
        return (*grads.result(incoming_scale(grad_loss)), None, None)


@dataclass
class _TokenLoss:
    """The GRPO loss terms of any token rows, following `plan` (see `grpo_loss.plan_loss`). Called chunk by chunk as
    the row kernels produce the log-probs, it returns `d loss / d logp` for those rows and keeps their terms, in
    token order, for the metrics."""

    backend: str
    options: LossOptions
    plan: LossPlan
    terms: list[TokenTerms] = field(default_factory=list)

    def __call__(
        self, offset: int, lo: int, hi: int, logp: torch.Tensor, entropy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`d loss / d logp [hi - lo]` of rows `offset + lo : offset + hi`, whose log-probs are `logp`. With
        `functools.partial(self, offset)` this is the `dlogp_fn` of a chunk starting at row `offset`."""
        rows = slice(offset + lo, offset + hi)
        part = token_terms(self.backend, logp, self.plan.log_weights(rows, logp), self.plan.tokens.rows(rows),
                           self.options)
        grad, part.dlogp = part.dlogp, None  # keep only what the metrics need
        self.terms.append(part)
        return grad


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
    """lm_head + log-prob + GRPO loss in one pass over row chunks. `hidden [B, T, D]`, `weight [V, D]`,
    `targets/old_logp/ref_logp/mask/entropy_mask [B, T]`, `advantages [B]`, `bias [V]` -> `(loss, metrics)` as
    `grpo_loss` (the same options), the entropy being the logits' own, plus the `entropy` metric. Targets at masked
    positions must still be valid ids (e.g. the pad id).

    The loss runs in a single pass (three GEMMs); the entropy bonus's gradient joins the log-prob's in the same
    row pass. Where a token's gradient needs its whole sequence's log-probs first (`grpo_loss.needs_sequence_logp`:
    sequence-level importance weights, VESPO or the off-policy mask off-policy, the bias-corrected KL at sequence
    level), one more GEMM computes them without grad before the pass. The top-entropy mask comes in as
    `entropy_mask`, its quantile taken by the caller over the whole batch (`high_entropy_mask`).
    """
    options = LossOptions(
        beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level, max_completion_length,
        use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos,
        vespo_k_neg, vespo_lambda_neg, off_policy_mask_threshold, entropy_coef,
    )
    backend = resolve_backend(hidden.device)
    if backend == "reference":
        return reference.fused_linear_grpo_loss(
            hidden, weight, targets, old_logp, ref_logp, advantages, mask, bias, temperature=temperature,
            chunk_size=chunk_size, compute_dtype=compute_dtype, entropy_mask=entropy_mask, **options.kwargs(),
        )
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D] (sequences of completion tokens), got {tuple(hidden.shape)}")
    check_fused_linear_args(hidden, weight, targets, bias)
    check_temperature(temperature)
    check_grpo_args(targets.shape, old_logp, ref_logp, advantages, mask, options, entropy_mask=entropy_mask)
    dtype = compute_dtype_of(hidden, weight, compute_dtype)
    chunk_rows = _resolve_chunk(chunk_size, weight, dtype)
    h, t = _flatten(hidden.detach(), targets)
    sequence_logp = None
    if needs_sequence_logp(options, old_logp is not None, ref_logp is not None):
        with torch.no_grad():
            sequence_logp = fused_linear_logprobs(hidden.detach(), weight.detach(), targets, bias,
                                                  temperature=temperature, chunk_size=chunk_rows, compute_dtype=dtype)
    plan = plan_loss(sequence_logp, old_logp, ref_logp, advantages, mask, entropy_mask, options)
    token_loss = _TokenLoss(backend, options, plan)

    row_kernels = row_ops(backend)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    needs = tuple(n and torch.is_grad_enabled() for n in needs)
    grads = GradBuffers(h, weight, bias, needs) if any(needs) else None
    entropy = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    grad_entropy = plan.grad_entropy
    head = LmHead(weight, bias, dtype, chunk_rows)
    for start, end, logits in head.chunks(h):
        if grads is None:
            logp, _, entropy[start:end] = row_kernels.row_stats(logits, t[start:end], temperature, return_entropy=True)
            token_loss(start, 0, end - start, logp)
        else:
            dlogp_fn = functools.partial(token_loss, start)
            _, entropy[start:end] = row_kernels.logprobs_and_grad_(
                logits, t[start:end], temperature, dlogp_fn, None if grad_entropy is None else grad_entropy[start:end]
            )
            grads.add_chunk(start, end, logits, h, head)
    loss, metrics = loss_and_metrics(token_loss.terms, plan, options, entropy)
    if grads is None:
        return loss, metrics
    if grads.hidden is not None:
        grads.hidden = grads.hidden.view(hidden.shape)
    return _FusedLinearGRPOLoss.apply(hidden, weight, bias, loss, grads), metrics
