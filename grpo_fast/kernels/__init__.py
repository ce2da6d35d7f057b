"""The GRPO math: public ops, each with a Triton, a chunked PyTorch and a plain reference implementation.

Dispatch (see `backend`): CUDA tensors -> Triton (chunked PyTorch where triton is not installed), CPU tensors ->
chunked PyTorch; `GRPO_FAST_BACKEND=triton|torch|reference` forces one. Importing the package never imports triton.
"""

from grpo_fast.kernels.advantages import group_advantages
from grpo_fast.kernels.backend import resolve_backend, use_backend
from grpo_fast.kernels.fused_linear import default_chunk_rows, fused_linear_grpo_loss, fused_linear_logprobs
from grpo_fast.kernels.grpo_loss import grpo_loss, high_entropy_mask
from grpo_fast.kernels.selective_logprobs import selective_logprobs

__all__ = [
    "default_chunk_rows",
    "fused_linear_grpo_loss",
    "fused_linear_logprobs",
    "group_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "resolve_backend",
    "selective_logprobs",
    "use_backend",
]
