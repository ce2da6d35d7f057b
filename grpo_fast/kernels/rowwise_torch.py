"""The same row operations as `rowwise_triton`, on CPU tensors: C++ kernels, with plain PyTorch ops as the fallback.

The C++ path (`row_stats` / `row_grad` of the `grpo_fast._tiling` extension, csrc/rowops*.cpp) takes fp32 and bf16
logits whose rows are contiguous (any row stride) and does the math in fp32. Per row: one pass for the max, one for
`e = exp((z - max) / T)` summed into the normalizer and the entropy's `sum e (z - max) / T` (fp32, element j into
accumulator j % 32, the 32 combined in a fixed tree), the row staying in L2 between the two; the gradient pass
computes `p = exp(log p)` again, `log p = (z - max) / T - log s`, rather than keep `e`, and writes `d logits` in
place or into `out` (bf16 rounded to nearest even). `exp` is Cephes' expf with FMAs (~1 ulp; exactly 0 for -inf).
Rows are spread over `row_threads_now()` native threads with the GIL released, each row done wholly by one
thread, and the scalar, AVX2 and AVX-512 kernels compute the same floats: results depend neither on the thread
count nor on the CPU (`grpo_fast.vision.tiling.allow_simd` picks the path for tests). `logprobs_and_grad_` runs the
statistics of every row of the chunk, one `dlogp_fn(0, R, ...)`, then the gradient: the chunk's logits come from
DRAM twice, which costs less than a Python `dlogp_fn` call per cache-sized block (measured on a 256-row chunk at
V = 151,936: ~0.4 ms per call, 20 calls at 8 MiB blocks, against ~4 ms for the second read).

The torch fallback (fp16, logits without unit column stride) processes rows in blocks of about `_BLOCK_ELEMS`
values, so that a block's fp32 scratch (2 MiB) stays in the last-level cache: DRAM then sees about one read of the
logits for the statistics and one write of `d logits`, and every other pass runs at cache bandwidth. Each block
costs one `exp` per logit: `e = exp((z - max) / T)` gives the normalizer, the entropy and, rescaled, the
probabilities of the gradient. A `[R, V]` temporary is never allocated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from grpo_fast.native import _tiling

_BLOCK_ELEMS = 1 << 19  # fp32 values per scratch block: 2 MiB (3 rows at a 150k vocab), so the block and its two
# scratch buffers stay in a shared 32 MiB L3 under load, while ~10 us of dispatch per op is still amortized over
# ~0.3 ms of work (measured here: 8 MiB blocks cost ~30% more CPU per logit, 1 MiB ~15% more)

# (start, end, logp [r], entropy [r]) -> d loss / d logp [r] for rows start:end
DlogpFn = Callable[[int, int, torch.Tensor, torch.Tensor | None], torch.Tensor]


_row_threads: int | None = None  # None: torch's own count, see `set_row_threads`


def set_row_threads(threads: int | None) -> None:
    """Threads of the CPU row ops (`row_stats`, `logprobs_and_grad_`, `row_grad`) for the rest of the process:
    the C++ kernels' native threads, and torch's intra-op threads inside the ops (the `dlogp_fn` of
    `logprobs_and_grad_`, the torch fallback), torch's own count (the GEMMs' around them) restored after each op;
    None, the default, leaves them on torch's count, which the trainer picks at start from how busy the cores are
    (`grpo_fast.threads`). The C++ results do not depend on the count (each row is done wholly by one thread).

    A row op waits for its slowest thread: where another process holds a core, one descheduled thread stalls the
    op (over OpenMP, the torch fallback's every ~0.3 ms block), while a GEMM of ~1 s barely notices.
    Measured on the 2-core AMD EPYC (Zen 4) while other runs loaded it (load average 4-7), fused loss fwd+bwd,
    D = 896, V = 151,936, fp32, interleaved, medians of 3-4, over the three-GEMM floor, with the torch row ops:
    N = 512, 1 row thread 0.98x against 2 threads 1.94x, and beside one more spinning process 1.17x against 1.59x.
    Idle it goes the other way: on an idle Intel Xeon the former one-thread pin made the loss 1.35x the floor, the
    GEMMs scaling with the cores and one thread's row ops not. Torch's count is 1 on a busy machine and every core
    on an idle one (`grpo_fast.threads`), so the row ops follow it; `benchmarks/test_loss.py::test_row_threads`
    times both counts, idle and busy. The count is fixed for a run rather than chosen per op from timings, so that
    a run's float rounding (the torch fallback's), and its resume, do not depend on the machine's load from one op
    to the next."""
    if threads is not None and threads < 1:
        raise ValueError(f"row threads must be >= 1, or None (torch's count), got {threads}")
    global _row_threads
    _row_threads = threads


def get_row_threads() -> int | None:
    """The `set_row_threads` value (None: torch's count)."""
    return _row_threads


def row_threads_now() -> int:
    """The intra-op threads the next row op runs on (see `set_row_threads`)."""
    return torch.get_num_threads() if _row_threads is None else _row_threads


def _on_row_threads(fn):
    """Run `fn` on `row_threads_now()` intra-op threads, torch's count restored after (also on an exception)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads, inner = torch.get_num_threads(), row_threads_now()
        if inner == threads:
            return fn(*args, **kwargs)
        torch.set_num_threads(inner)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _cpp_rows(*tensors: torch.Tensor) -> bool:
    """Whether the C++ row ops take these `[R, V]` tensors: CPU, fp32 or bf16, V >= 1, unit column stride and rows
    that do not overlap (any row stride >= V)."""
    return all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.dim() == 2 and t.shape[1] >= 1
        and (t.shape[1] == 1 or t.stride(1) == 1) and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])
        for t in tensors
    )


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of CPU tensor `t` for the C++ row ops: bf16 as its uint16 bit patterns."""
    t = t.detach()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _vec(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """`t [R]` as a contiguous numpy array of `dtype` (a view when it already is one)."""
    return t.detach().to(dtype).contiguous().numpy()


def _blocks(rows: int, n_cols: int) -> tuple[int, range]:
    step = max(1, _BLOCK_ELEMS // n_cols)
    return step, range(0, rows, step)


def _as_fp32(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The block itself when fp32, else its fp32 copy in `scratch`."""
    return z if z.dtype == torch.float32 else scratch.copy_(z)


def _block_stats(
    z: torch.Tensor, inv_t: float, e: torch.Tensor, zm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For fp32 logits `z [r, V]`: fills `e = exp((z - max) / T)` and returns its row sums `s`, the `lse` of z / T
    and, when a second scratch `zm` is given, the entropy `log s - E_p[(z - max) / T]` (computed from the shifted
    logits, which avoids the cancellation of lse - E_p[z / T]). Sums are torch's cascade sums: ~1e-6 relative at
    150k terms."""
    m = z.amax(dim=-1, keepdim=True)
    shifted = torch.sub(z, m, out=e if zm is None else zm)
    if inv_t != 1.0:
        shifted.mul_(inv_t)
    if zm is not None:
        shifted.clamp_(min=-1e30)  # a masked (-inf) logit: exp gives 0 either way, and 0 * -1e30 = 0 in the entropy
    torch.exp(shifted, out=e)
    s = e.sum(dim=-1)
    log_s = s.log()
    entropy = None
    if zm is not None:
        # sum(e (z - max)) in place over the shifted logits, a cascade sum (a BLAS dot over 150k terms is ~10x
        # less accurate)
        dot = zm.mul_(e).sum(dim=-1)
        entropy = log_s - dot / s
    return s, m.squeeze(-1) * inv_t + log_s, entropy


def _target_logits(logits: torch.Tensor, targets: torch.Tensor, inv_t: float) -> torch.Tensor:
    return logits.gather(1, targets.view(-1, 1).long()).squeeze(1).float() * inv_t


@_on_row_threads
def row_stats(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`logits [R, V]`, `targets [R]` -> fp32 `logp [R]`, `lse [R]` (of logits / T), `entropy [R]` or None."""
    rows, n_cols = logits.shape
    inv_t = 1.0 / temperature
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    entropy = torch.empty_like(lse) if return_entropy else None
    if _cpp_rows(logits):
        logp = torch.empty_like(lse)
        _tiling.row_stats(_np(logits), _vec(targets, torch.int64), inv_t, logp.numpy(), lse.numpy(),
                          None if entropy is None else entropy.numpy(), num_threads=row_threads_now())
        return logp, lse, entropy
    step, starts = _blocks(rows, n_cols)
    e = torch.empty(min(step, rows), n_cols, device=logits.device, dtype=torch.float32)
    zm = torch.empty_like(e) if return_entropy else None
    z32 = torch.empty_like(e) if logits.dtype != torch.float32 else None
    for start in starts:
        end = min(start + step, rows)
        r = end - start
        z = _as_fp32(logits[start:end], z32[:r] if z32 is not None else None)
        _, lse[start:end], ent = _block_stats(z, inv_t, e[:r], None if zm is None else zm[:r])
        if entropy is not None:
            entropy[start:end] = ent
    return _target_logits(logits, targets, inv_t) - lse, lse, entropy


@_on_row_threads
def logprobs_and_grad_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    dlogp_fn: DlogpFn,
    grad_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of `logits [R, V]`, and `d loss / d logits` written over the logits: the
    statistics, then `g = dlogp_fn(start, end, logp, entropy)` (the loss gradient needs the log-probs), then
    `d z = g (onehot - p) / T`, plus `- g_H p (log p + H) / T` when `grad_entropy` (`g_H [R]`, fp32) is given.
    The C++ path calls `dlogp_fn` once, for rows 0:R; the torch fallback once per block, from the block's `exp`
    still in cache. Returns fp32 `logp [R]`, `entropy [R]`."""
    rows, n_cols = logits.shape
    inv_t = 1.0 / temperature
    logp = torch.empty(rows, device=logits.device, dtype=torch.float32)
    entropy = torch.empty_like(logp)
    if _cpp_rows(logits):
        _cpp_logprobs_and_grad_(logits, targets, inv_t, dlogp_fn, grad_entropy, logp, entropy)
        return logp, entropy
    target_logit = _target_logits(logits, targets, inv_t)
    step, starts = _blocks(rows, n_cols)
    e = torch.empty(min(step, rows), n_cols, device=logits.device, dtype=torch.float32)
    zm = torch.empty_like(e)
    z32 = torch.empty_like(e) if logits.dtype != torch.float32 else None
    for start in starts:
        end = min(start + step, rows)
        r = end - start
        z = logits[start:end]
        z_fp32 = _as_fp32(z, z32[:r] if z32 is not None else None)
        s, lse, entropy[start:end] = _block_stats(z_fp32, inv_t, e[:r], zm[:r])
        logp[start:end] = target_logit[start:end] - lse
        g = dlogp_fn(start, end, logp[start:end], entropy[start:end]).float() * inv_t
        # d z = g / T (onehot - e / s); the one-hot term is added in fp32 before any downcast
        coef = (-g / s).unsqueeze(1)
        if grad_entropy is not None:
            # plus the entropy's share, - g_H p (log p + H) / T = e (log p + H) (-g_H / (s T)), log p = z / T - lse,
            # in the free scratch zm before z is overwritten; a masked (-inf) logit has e = 0, and 0 * -1e30 = 0
            coef = torch.mul(z_fp32, inv_t, out=zm[:r]).sub_(lse.unsqueeze(1)).add_(entropy[start:end, None])
            coef.clamp_(min=-1e30).mul_((-grad_entropy[start:end] * inv_t / s).unsqueeze(1)).sub_((g / s).unsqueeze(1))
        d = z if z.dtype == torch.float32 else e[:r]
        torch.mul(e[:r], coef, out=d)
        d.scatter_add_(1, targets[start:end].view(-1, 1).long(), g.unsqueeze(1))
        if d is not z:
            z.copy_(d)
    return logp, entropy


def _cpp_logprobs_and_grad_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_t: float,
    dlogp_fn: DlogpFn,
    grad_entropy: torch.Tensor | None,
    logp: torch.Tensor,
    entropy: torch.Tensor,
) -> None:
    """`logprobs_and_grad_` by the C++ row ops, filling `logp [R]` and `entropy [R]`: the statistics of every row
    (and its max m and log s), one `dlogp_fn(0, R, ...)`, then `d logits` from log p = (z - m) / T - log s."""
    rows = logits.shape[0]
    z, ids, threads = _np(logits), _vec(targets, torch.int64), row_threads_now()
    lse, row_max, log_sum = (np.empty(rows, dtype=np.float32) for _ in range(3))
    _tiling.row_stats(z, ids, inv_t, logp.numpy(), lse, entropy.numpy(), row_max, log_sum, num_threads=threads)
    g = _vec(dlogp_fn(0, rows, logp, entropy))
    has_h = grad_entropy is not None
    _tiling.row_grad(z, ids, inv_t, log_sum, g, shift=row_max, grad_entropy=_vec(grad_entropy) if has_h else None,
                     entropy=entropy.numpy() if has_h else None, out=z, num_threads=threads)


@_on_row_threads
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
    """Write `d loss / d logits [R, V]` into `out` (may be `logits` itself): `(g (onehot - p) - g_H p (log p + H)) / T`
    with `p = exp(z / T - lse)`."""
    rows, n_cols = logits.shape
    inv_t = 1.0 / temperature
    if _cpp_rows(logits, out) and out.dtype == logits.dtype:
        has_h = grad_entropy is not None
        _tiling.row_grad(_np(logits), _vec(targets, torch.int64), inv_t, _vec(lse), _vec(grad_logp),
                         grad_entropy=_vec(grad_entropy) if has_h else None, entropy=_vec(entropy) if has_h else None,
                         out=_np(out), num_threads=row_threads_now())
        return out
    step, starts = _blocks(rows, n_cols)
    scratch = torch.empty(min(step, rows), n_cols, device=logits.device, dtype=torch.float32)
    probs = torch.empty_like(scratch) if grad_entropy is not None else None
    for start in starts:
        end = min(start + step, rows)
        lp = scratch[: end - start].copy_(logits[start:end])
        if inv_t != 1.0:
            lp.mul_(inv_t)
        lp.sub_(lse[start:end, None])
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
