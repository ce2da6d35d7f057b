"""The same row operations as `rowwise_triton`, in plain PyTorch ops: the fast CPU path.

Rows are processed in blocks of about `_BLOCK_ELEMS` values, so that the block's fp32 scratch (8 MiB) stays in
the last-level cache: each op on it then costs cache bandwidth, and DRAM sees one read of the logits for the
statistics and one read plus one write for the gradient, as in the Triton kernels. A `[R, V]` temporary is
never allocated.
"""

from __future__ import annotations

import torch

_BLOCK_ELEMS = 1 << 21  # fp32 values per scratch block: 8 MiB (13 rows at a 150k vocab), two of them inside a
# 32 MiB L3, and large enough to amortize ~10 us of Python/dispatch per op over ~1 ms of work


def _row_blocks(rows: int, n_cols: int) -> range:
    return range(0, rows, max(1, _BLOCK_ELEMS // n_cols))


def _scaled(z: torch.Tensor, inv_temperature: float, scratch: torch.Tensor) -> torch.Tensor:
    """`z / T` in fp32 into `scratch` (upcast first: bf16 * scalar would round in bf16)."""
    scratch.copy_(z)
    return scratch.mul_(inv_temperature) if inv_temperature != 1.0 else scratch


def row_stats(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`logits [R, V]`, `targets [R]` -> fp32 `logp [R]`, `lse [R]` (of logits / T), `entropy [R]` or None."""
    rows, n_cols = logits.shape
    inv_t = 1.0 / temperature
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    entropy = torch.empty_like(lse) if return_entropy else None
    step = max(1, _BLOCK_ELEMS // n_cols)
    scratch = torch.empty(min(step, rows), n_cols, device=logits.device, dtype=torch.float32)
    probs = torch.empty_like(scratch) if return_entropy else None
    for start in _row_blocks(rows, n_cols):
        end = min(start + step, rows)
        z = logits[start:end]
        if return_entropy or inv_t != 1.0 or z.dtype != torch.float32:  # else logsumexp reads the logits as they are
            z = _scaled(z, inv_t, scratch[: end - start])
        # logsumexp sums in cascade: ~1e-6 relative at 150k terms, where log_softmax's running sum gives ~1e-5
        lse[start:end] = torch.logsumexp(z, dim=-1)
        if entropy is not None:
            lp = z.sub_(lse[start:end, None])
            p = torch.exp(lp, out=probs[: end - start])
            # -sum p log p; a -inf log-prob (a masked vocab entry) has p = 0 and contributes 0, not NaN
            entropy[start:end] = -torch.linalg.vecdot(p, lp.clamp_(min=torch.finfo(torch.float32).min))
    target_logit = logits.gather(1, targets.view(-1, 1).long()).squeeze(1).float() * inv_t
    return target_logit - lse, lse, entropy


def row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write `d loss / d logits [R, V]` into `out` (may be `logits` itself): `(g (onehot - p) - g_H p (log p + H)) / T`."""
    rows, n_cols = logits.shape
    inv_t = 1.0 / temperature
    step = max(1, _BLOCK_ELEMS // n_cols)
    scratch = torch.empty(min(step, rows), n_cols, device=logits.device, dtype=torch.float32)
    probs = torch.empty_like(scratch) if grad_entropy is not None else None
    for start in _row_blocks(rows, n_cols):
        end = min(start + step, rows)
        block = scratch[: end - start]
        lp = _scaled(logits[start:end], inv_t, block).sub_(lse[start:end, None])
        g = grad_logp[start:end, None]
        if grad_entropy is None:
            coef = lp.exp_().mul_(-g * inv_t)
        else:
            # p * (-g - g_H (log p + H)) / T, from log p in place; log p + H first, as it nearly cancels
            p = torch.exp(lp, out=probs[: end - start])
            g_h = grad_entropy[start:end, None]
            coef = lp.nan_to_num_(neginf=0.0).add_(entropy[start:end, None]).mul_(-g_h).sub_(g).mul_(p)
            coef.mul_(inv_t)
        # the one-hot term, + g / T at the target, added in fp32 before any downcast of `out`
        coef.scatter_add_(1, targets[start:end].view(-1, 1).long(), g * inv_t)
        out[start:end].copy_(coef)
    return out
