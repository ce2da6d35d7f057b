"""Triton row kernels over `[R, V]` logits: streaming log-softmax statistics, and `d logits` written in place.

`row_stats` reads each row once: an online (streaming) logsumexp over V in `BLOCK_SIZE` blocks (Milakov &
Gimelshein, "Online normalizer calculation for softmax", 2018), the target's logit, and optionally the entropy
`H = log s + E_p[m - z]` (m the row max, s = sum exp(z - m)): a sum of two non-negative terms, so nothing cancels,
where `lse - E_p[z]` would lose the digits of lse. The running sum `t = sum exp(z - m) (z - m)` follows a new max
m' as `t' = exp(m - m') (t + (m - m') s)`, the normalizer's rescaling plus the shift of every term.
`row_grad` reads each row once more and writes `d logits`, possibly over the logits themselves (the fused
lm_head path owns its chunk buffer): `d z_j = (g * (1[j = target] - p_j) - g_H * p_j * (log p_j + H)) / T`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_fast.kernels import interpreter


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    logits_stride,
    targets_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    n_cols,
    inv_temperature,
    BLOCK_SIZE: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before the stride multiply: R * V overflows int32 at 150k vocab
    logits_ptr += row * logits_stride
    m = tl.full([], -float("inf"), tl.float32)  # running max
    s = tl.full([], 0.0, tl.float32)  # running sum exp(z - m)
    t = tl.full([], 0.0, tl.float32)  # running sum exp(z - m) * (z - m), for the entropy
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        valid = cols < n_cols
        z = tl.load(logits_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # while every logit so far is -inf (a masked start of the vocabulary), shift by 0: exp(-inf - -inf)
        # would be NaN, exp(-inf - 0) is the 0 it should be
        m_shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        rescale = tl.exp(m - m_shift)
        e = tl.exp(z - m_shift)
        if RETURN_ENTROPY:
            # the guards keep -inf * 0 out: m is -inf while s = 0, and a -inf logit adds 0
            t = rescale * (t + tl.where(s > 0, m - m_shift, 0.0) * s)
            t += tl.sum(e * tl.where(e > 0, z - m_shift, 0.0), axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    target = tl.load(targets_ptr + row).to(tl.int64)
    target_logit = tl.load(logits_ptr + target).to(tl.float32) * inv_temperature
    tl.store(logp_ptr + row, target_logit - lse)
    tl.store(lse_ptr + row, lse)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, log_s - t / s)


@triton.jit
def _row_grad_kernel(
    logits_ptr,
    logits_stride,
    dlogits_ptr,
    dlogits_stride,
    targets_ptr,
    lse_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    entropy_ptr,
    n_cols,
    inv_temperature,
    BLOCK_SIZE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    dlogits_ptr += row * dlogits_stride
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_logp_ptr + row)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row)
        h = tl.load(entropy_ptr + row)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        valid = cols < n_cols
        z = tl.load(logits_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_temperature
        logp = z - lse
        p = tl.exp(logp)
        d = tl.where(cols == target, g - g * p, -g * p)
        if HAS_GRAD_ENTROPY:
            d -= g_h * p * tl.where(p > 0, logp + h, 0.0)
        tl.store(dlogits_ptr + cols, (d * inv_temperature).to(dlogits_ptr.dtype.element_ty), mask=valid)


# The widest block. On a GPU, 4096 fp32 per block over 8 warps is 16 values per thread: enough loads in flight to
# stream at bandwidth without spilling; 150k vocab is ~37 blocks per row. The interpreter runs each block as numpy
# arrays, so there a wider block means fewer Python-level iterations; tests set `max_block = GPU_MAX_BLOCK` to run
# the GPU's launch configuration under the interpreter.
GPU_MAX_BLOCK = 4096
max_block = 1 << 16 if interpreter.TRITON_INTERPRET else GPU_MAX_BLOCK


def launch_config(n_cols: int) -> tuple[int, int]:
    """BLOCK_SIZE and num_warps for a row of `n_cols`."""
    block = min(triton.next_power_of_2(n_cols), max_block)
    return block, 8 if block >= 2048 else 4


def row_stats(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`logits [R, V]` (unit column stride), `targets [R]` -> fp32 `logp [R]`, `lse [R]`, `entropy [R]` or None."""
    rows, n_cols = logits.shape
    logp = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    if rows == 0:
        return logp, lse, entropy
    block, warps = launch_config(n_cols)
    _row_stats_kernel[(rows,)](
        logits, logits.stride(0), targets, logp, lse, entropy if return_entropy else logp, n_cols,
        1.0 / temperature, BLOCK_SIZE=block, RETURN_ENTROPY=return_entropy, num_warps=warps,
    )
    return logp, lse, entropy


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
    """Write `d loss / d logits [R, V]` into `out` (may be `logits` itself). `grad_logp/grad_entropy [R]` fp32."""
    rows, n_cols = logits.shape
    if rows == 0:
        return out
    block, warps = launch_config(n_cols)
    has_h = grad_entropy is not None
    _row_grad_kernel[(rows,)](
        logits, logits.stride(0), out, out.stride(0), targets, lse, grad_logp,
        grad_entropy if has_h else grad_logp, entropy if has_h else lse, n_cols, 1.0 / temperature,
        BLOCK_SIZE=block, HAS_GRAD_ENTROPY=has_h, num_warps=warps,
    )
    return out


def logprobs_and_grad_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    dlogp_fn,
    grad_entropy: torch.Tensor | None = None,
):
    """Log-probs and entropies of `logits [R, V]`, then `d loss / d logits` written over the logits, where
    `dlogp_fn(0, R, logp, entropy)` gives `d loss / d logp [R]` and `grad_entropy [R]` (fp32, or None)
    `d loss / d entropy`: two streaming passes over each row."""
    logp, lse, entropy = row_stats(logits, targets, temperature, return_entropy=True)
    grad_logp = dlogp_fn(0, logits.shape[0], logp, entropy).float().contiguous()
    row_grad(logits, targets, lse, grad_logp, grad_entropy, None if grad_entropy is None else entropy, temperature,
             out=logits)
    return logp, entropy
