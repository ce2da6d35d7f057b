"""`log_softmax(logits / T)[target]` without a full log-softmax copy of the logits.

The forward streams each row once (`row_stats`) and keeps only the fp32 logsumexp per row; the backward
writes `d logits` from the logits and that logsumexp (`row_grad`).
"""

from __future__ import annotations

import torch

from grpo_fast.kernels import reference
from grpo_fast.kernels.backend import resolve_backend, row_ops
from grpo_fast.kernels.checks import check_logits


class _SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
        logp, lse, _ = row_ops(backend).row_stats(logits, targets, temperature, return_entropy=False)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.backend = temperature, backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        dlogits = torch.empty_like(logits)
        row_ops(ctx.backend).row_grad(
            logits, targets, lse, grad_logp.float().contiguous(), None, None, ctx.temperature, dlogits
        )
        return dlogits, None, None, None


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each target. `logits [..., V]` (fp32/bf16), `targets [...]` int -> fp32 `[...]`, differentiable."""
    backend = resolve_backend(logits.device)
    if backend == "reference":
        return reference.selective_logprobs(logits, targets, temperature=temperature)
    check_logits(logits, targets, temperature)
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    logp = _SelectiveLogprobs.apply(flat, targets.reshape(-1).contiguous(), temperature, backend)
    return logp.view(targets.shape)
