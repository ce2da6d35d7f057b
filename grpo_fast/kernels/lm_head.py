"""The lm_head GEMMs of the fused paths, chunk by chunk: the logits, then `d hidden`, `d weight` and `d bias`.

The GEMMs run in one compute dtype: `compute_dtype` when given, else the narrower of hidden's and weight's dtypes,
so that a bf16 hidden state (the model under autocast) meets its fp32 master weight in a bf16 GEMM, as autocast's
own lm_head would, and an fp32 pair stays fp32. The logits buffer and `d logits` hold that dtype; the row kernels
read it and work in fp32. `d hidden` is written once per row, in the compute dtype, then cast; `d weight` and
`d bias` sum over every chunk, so they accumulate in fp32 whatever the compute dtype (a bf16 rounding per chunk
would lose the low bits of each chunk's share), and come back in the parameters' dtypes.

Memory: an fp32 master weight with bf16 compute costs a bf16 copy of it, `V * D * 2` bytes (1.2 GB at V = 151,936,
D = 4,096), for the duration of the call, the same copy autocast keeps for a Linear.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch


def compute_dtype_of(hidden: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The GEMM dtype: `compute_dtype`, else the dtype of the fewer mantissa bits among hidden's and weight's."""
    if compute_dtype is not None:
        if not compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating-point dtype (torch.float32 or torch.bfloat16), "
                             f"got {compute_dtype}")
        return compute_dtype
    return max((hidden.dtype, weight.dtype), key=lambda d: torch.finfo(d).eps)


class LmHead:
    """`weight [V, D]` and `bias [V]` (or None) cast once to the compute dtype, and the chunk loop over them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, chunk_rows: int) -> None:
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.dtype, self.chunk_rows = dtype, chunk_rows

    def chunks(self, hidden: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield `(start, end, logits [end - start, V])` for each row chunk of `hidden [N, D]`, reusing one buffer."""
        rows = hidden.shape[0]
        buf = torch.empty(min(self.chunk_rows, rows), self.weight.shape[0], device=hidden.device, dtype=self.dtype)
        for start in range(0, rows, self.chunk_rows):
            end = min(start + self.chunk_rows, rows)
            logits = buf[: end - start]
            h = hidden[start:end].detach().to(self.dtype)
            if self.bias is None:
                torch.mm(h, self.weight.t(), out=logits)
            else:
                torch.addmm(self.bias, h, self.weight.t(), out=logits)
            yield start, end, logits


@functools.cache
def fp32_out_addmm(device_type: str) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` adds a bf16 product to an fp32 `acc`
    on this device type. It needs torch's `out_dtype` overload of addmm (absent from older torch: TypeError) and
    an fp32 `self` beside bf16 matrices, which CUDA rejected until pytorch#167931 (RuntimeError); CPU builds have
    no such kernel (NotImplementedError, a RuntimeError). So it is tried once per device type, on 2 x 2 matrices,
    and its value checked, rather than read from a version number."""
    eye = torch.eye(2, device=device_type)
    acc = torch.ones(2, 2, device=device_type)
    try:
        torch.addmm(acc, eye.bfloat16(), eye.bfloat16(), beta=1.0, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):
        return False
    return acc.dtype == torch.float32 and torch.equal(acc, eye + 1.0)


def accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """`acc = a @ b` (first) or `acc += a @ b`, with `acc` fp32. bf16 products are summed in fp32, never rounded to
    bf16: by addmm's fp32 output where `fp32_out_addmm` (a bf16 GEMM), else by upcasting the operands (exact too,
    a bf16 product being exact in fp32, at the cost of their fp32 copies and an fp32 GEMM). beta = 0 on the first
    chunk spares zero-filling `acc`, a pass over [V, D]."""
    beta = 0.0 if first else 1.0
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif fp32_out_addmm(acc.device.type):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)


class GradBuffers:
    """`d hidden [N, D]`, `d weight [V, D]` (fp32 accumulator), `d bias [V]` (fp32), filled chunk by chunk.

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

    def add_chunk(self, start: int, end: int, dlogits: torch.Tensor, hidden: torch.Tensor, head: LmHead) -> None:
        """Add the share of rows start:end, from their `dlogits [C, V]` (compute dtype)."""
        if self.hidden is not None:
            if self.hidden.dtype == head.dtype:
                torch.mm(dlogits, head.weight, out=self.hidden[start:end])
            else:
                self.hidden[start:end] = dlogits @ head.weight
        if self.weight is not None:
            h = hidden[start:end].detach().to(head.dtype)
            accumulate_mm_(self.weight, dlogits.t(), h, first=not self.weight_started)
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


def incoming_scale(grad: torch.Tensor) -> torch.Tensor | None:
    """None when the incoming gradient is exactly 1 on CPU (skip a pass over d weight); else the tensor.
    On GPU the check would cost a sync, so the multiply always runs there."""
    if grad.device.type == "cpu" and grad.item() == 1.0:
        return None
    return grad
