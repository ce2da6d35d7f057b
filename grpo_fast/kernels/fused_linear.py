"""lm_head + log-probs (and the GRPO loss) over row chunks, never holding more than one chunk of logits.

Per chunk of C token rows: `logits [C, V] = hidden_c @ weight.T + bias` (one GEMM: cuBLAS / BLAS), the row
kernels turn it into log-probs and then, in place, into `d logits`, and two GEMMs give the chunk's share of
`d hidden` and `d weight`. In `fused_linear_grpo_loss` the loss gradient of each token is known as soon as its
log-prob is (see `grpo_loss`), so value and gradients come out of a single pass: three GEMMs in all, the same
as the full-logits path, with the `[N, V]` logits replaced by one `[C, V]` buffer (the approach of Liger's
fused linear cross-entropy, here with the GRPO loss in the middle).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from grpo_fast.kernels import reference
from grpo_fast.kernels.backend import resolve_backend, row_ops
from grpo_fast.kernels.checks import check_fused_linear_args, check_grpo_args, check_temperature, grpo_defaults
from grpo_fast.kernels.grpo_loss import (
    GRPOParams,
    TokenTerms,
    flat_fp32,
    sequence_log_ratio,
    summarize,
    token_terms,
    token_weights,
)

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


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_rows: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield `(start, end, logits [end - start, V])` for each row chunk, reusing one buffer."""
    rows = hidden.shape[0]
    buf = torch.empty(min(chunk_rows, rows), weight.shape[0], device=hidden.device, dtype=weight.dtype)
    for start in range(0, rows, chunk_rows):
        end = min(start + chunk_rows, rows)
        logits = buf[: end - start]
        h = hidden[start:end].to(weight.dtype)
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias.to(weight.dtype), h, weight.t(), out=logits)
        yield start, end, logits


def _accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """`acc = a @ b` (first) or `acc += a @ b`, with `acc` fp32. bf16 products are not rounded to bf16 before the
    sum: on CUDA via addmm's fp32 output, elsewhere by upcasting the operands (a rounding per chunk would bias the
    accumulated gradient). beta = 0 on the first chunk spares zero-filling `acc`, a pass over [V, D]."""
    beta = 0.0 if first else 1.0
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)


class _GradBuffers:
    """`d hidden [N, D]`, `d weight [V, D]` (fp32 accumulator), `d bias [V]`, filled chunk by chunk.

    Only the gradients that are needed get a buffer: a frozen lm_head (LoRA) skips the `d weight` GEMM and its
    `[V, D]` buffer entirely.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple) -> None:
        need_hidden, need_weight, need_bias = needs
        self.hidden = torch.empty_like(hidden) if need_hidden else None
        self.weight = torch.empty(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
        self.weight_started = False
        self.bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_bias else None
        self.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)

    def add_chunk(self, start: int, end: int, dlogits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor):
        """Add the share of rows start:end, from their `dlogits [C, V]` (weight dtype)."""
        if self.hidden is not None:
            if self.hidden.dtype == weight.dtype:
                torch.mm(dlogits, weight, out=self.hidden[start:end])
            else:
                self.hidden[start:end] = dlogits @ weight
        if self.weight is not None:
            _accumulate_mm_(self.weight, dlogits.t(), hidden[start:end].to(weight.dtype), first=not self.weight_started)
            self.weight_started = True
        if self.bias is not None:
            self.bias += dlogits.sum(0, dtype=torch.float32)

    def result(self, scale: torch.Tensor | None) -> list[torch.Tensor | None]:
        """`[d hidden, d weight, d bias]` in the inputs' dtypes, multiplied in place by `scale` unless None."""
        grads = [self.hidden, self.weight, self.bias]
        self.hidden = self.weight = self.bias = None
        return [
            None if g is None else (g if scale is None else g.mul_(scale)).to(dtype)
            for g, dtype in zip(grads, self.dtypes)
        ]


def _incoming_scale(grad: torch.Tensor) -> torch.Tensor | None:
    """None when the incoming gradient is exactly 1 on CPU (skip a pass over d weight); else the tensor.
    On GPU the check would cost a sync, so the multiply always runs there."""
    if grad.device.type == "cpu" and grad.item() == 1.0:
        return None
    return grad


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, return_entropy, backend):
        rows = row_ops(backend)
        n = hidden.shape[0]
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        for start, end, logits in _chunk_logits(hidden, weight, bias, chunk_rows):
            lp, ls, ent = rows.row_stats(logits, targets[start:end], temperature, return_entropy)
            logp[start:end], lse[start:end] = lp, ls
            if entropy is not None:
                entropy[start:end] = ent
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.backend = temperature, chunk_rows, backend
        ctx.set_materialize_grads(False)
        if entropy is None:
            return logp, None
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 8
        rows = row_ops(ctx.backend)
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        grads = _GradBuffers(hidden, weight, bias, ctx.needs_input_grad[:3])
        for start, end, logits in _chunk_logits(hidden, weight, bias, ctx.chunk_rows):
            rows.row_grad(
                logits, targets[start:end], lse[start:end], grad_logp[start:end],
                None if grad_entropy is None else grad_entropy[start:end],
                None if grad_entropy is None else entropy[start:end], ctx.temperature, out=logits,
            )
            grads.add_chunk(start, end, logits, hidden, weight)
        return (*grads.result(None), None, None, None, None, None)


def _flatten(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).contiguous()


def _resolve_chunk(chunk_size: int | None, weight: torch.Tensor) -> int:
    if chunk_size is None:
        return default_chunk_rows(weight.shape[0], weight.shape[1], weight.element_size())
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return chunk_size


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` under the lm_head, chunk by chunk. `hidden [..., D]`, `weight [V, D]` (the lm_head),
    `targets [...]`, `bias [V]` -> fp32 `logp [...]` (and `entropy [...]`, nats). `chunk_size`: rows per chunk
    (default from V and D, see `default_chunk_rows`). Gradients flow to hidden, weight and bias.
    """
    backend = resolve_backend(hidden.device)
    if backend == "reference":
        return reference.fused_linear_logprobs(hidden, weight, targets, bias, temperature, chunk_size, return_entropy)
    check_fused_linear_args(hidden, weight, targets, bias)
    check_temperature(temperature)
    h, t = _flatten(hidden, targets)
    logp, entropy = _FusedLinearLogprobs.apply(
        h, weight, bias, t, temperature, _resolve_chunk(chunk_size, weight), return_entropy, backend
    )
    if return_entropy:
        return logp.view(targets.shape), entropy.view(targets.shape)
    return logp.view(targets.shape)


class _FusedLinearGRPOLoss(torch.autograd.Function):
    """Loss value and all three gradients in the forward (one pass, three GEMMs); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, grads: _GradBuffers):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # no reference may stay behind: autograd then adopts the buffers
        return (*grads.result(_incoming_scale(grad_loss)), None, None)


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
    """lm_head + log-prob + GRPO loss in one pass over row chunks. `hidden [B, T, D]`, `weight [V, D]`,
    `targets/mask/ref_logp/old_logp [B, T]`, `advantages [B]`, `bias [V]` -> `(loss, metrics)` as `grpo_loss`,
    plus the `entropy` metric. Targets at masked positions must still be valid ids (e.g. the pad id).

    Token-level importance sampling runs in a single pass (three GEMMs). Sequence level needs each sequence's
    mean log-ratio before any token's gradient, so it first computes the log-probs (one more GEMM, no grad).
    """
    backend = resolve_backend(hidden.device)
    if backend == "reference":
        return reference.fused_linear_grpo_loss(
            hidden, weight, targets, mask, advantages, bias, ref_logp, old_logp, beta=beta, epsilon_low=epsilon_low,
            epsilon_high=epsilon_high, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
            temperature=temperature, max_completion_length=max_completion_length, chunk_size=chunk_size, delta=delta,
        )
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D] (sequences of completion tokens), got {tuple(hidden.shape)}")
    check_fused_linear_args(hidden, weight, targets, bias)
    check_temperature(temperature)
    check_grpo_args(targets.shape, old_logp, ref_logp, advantages, mask, beta, loss_type, importance_sampling_level)
    params = GRPOParams(beta, epsilon_low, grpo_defaults(epsilon_low, epsilon_high), delta)
    weights = token_weights(mask, loss_type, importance_sampling_level, max_completion_length)
    chunk_rows = _resolve_chunk(chunk_size, weight)
    h, t = _flatten(hidden.detach(), targets)
    w, u = flat_fp32(weights.w), flat_fp32(weights.u)
    adv = flat_fp32(advantages.float().unsqueeze(1).expand(mask.shape))
    old = None if old_logp is None else flat_fp32(old_logp)
    ref = None if ref_logp is None else flat_fp32(ref_logp)
    liw_seq = None
    if importance_sampling_level == "sequence":
        with torch.no_grad():
            logp = fused_linear_logprobs(hidden.detach(), weight.detach(), targets, bias, temperature, chunk_rows)
        liw_seq = flat_fp32(sequence_log_ratio(logp, old_logp, mask))

    rows = row_ops(backend)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    needs = tuple(n and torch.is_grad_enabled() for n in needs)
    grads = _GradBuffers(h, weight, bias, needs) if any(needs) else None
    terms: list[TokenTerms] = []
    entropy = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    w_, b_ = weight.detach(), None if bias is None else bias.detach()
    for start, end, logits in _chunk_logits(h, w_, b_, chunk_rows):

        def dlogp(lo: int, hi: int, logp: torch.Tensor, _entropy, start=start) -> torch.Tensor:
            """The loss terms of rows start+lo : start+hi, kept for the metrics; returns d loss / d logp."""
            rows_ = slice(start + lo, start + hi)
            if liw_seq is not None:
                liw = liw_seq[rows_]
            else:
                liw = logp - old[rows_] if old is not None else torch.zeros_like(logp)
            part = token_terms(backend, logp, liw, adv[rows_], w[rows_], u[rows_],
                               None if ref is None else ref[rows_], params)
            grad, part.dlogp = part.dlogp, None  # keep only what the metrics need
            terms.append(part)
            return grad

        if grads is None:
            logp, _, entropy[start:end] = rows.row_stats(logits, t[start:end], temperature, return_entropy=True)
            dlogp(0, end - start, logp, None)
        else:
            _, entropy[start:end] = rows.logprobs_and_grad_(logits, t[start:end], temperature, dlogp)
            grads.add_chunk(start, end, logits, h, w_)
    loss, metrics = summarize(terms, mask, weights.metric, entropy)
    if grads is None:
        return loss, metrics
    if grads.hidden is not None:
        grads.hidden = grads.hidden.view(hidden.shape)
    return _FusedLinearGRPOLoss.apply(hidden, weight, bias, loss, grads), metrics
