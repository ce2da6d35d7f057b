"""Which implementation runs an op: chosen once, here.

Rule: `GRPO_FAST_BACKEND=triton|torch|reference` (or the `use_backend` override, which tests use) wins;
otherwise CUDA tensors run the Triton kernels (the chunked PyTorch path where triton is not installed) and CPU
tensors the chunked PyTorch path. Triton on CPU tensors works only under the interpreter (`TRITON_INTERPRET=1`
set before `grpo_fast.kernels` is imported), which is how the test suite checks the kernels on machines without
a GPU. triton is imported only by the `*_triton` modules, on first use of the triton backend: the package and
the CPU path work where triton is not installed (macOS, Windows).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from grpo_fast.kernels import interpreter

BACKENDS = ("triton", "torch", "reference")

_override: str | None = None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend inside the block (None: back to automatic choice)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


@functools.cache
def triton_installed() -> bool:
    """Whether `import triton` works (it is tried once, and only when a CUDA tensor or the triton backend asks)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device) -> str:
    """The backend for tensors on `device`, after the override and `GRPO_FAST_BACKEND`."""
    name = _override or os.environ.get("GRPO_FAST_BACKEND") or None
    if name is None:
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"GRPO_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_installed():
        raise RuntimeError("the triton backend needs the triton package (`pip install triton`, Linux), or use "
                           "GRPO_FAST_BACKEND=torch")
    if name == "triton" and device.type == "cpu" and not interpreter.TRITON_INTERPRET:
        raise RuntimeError(
            "the triton backend on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing grpo_fast (or use GRPO_FAST_BACKEND=torch, the fast CPU path)"
        )
    return name


def row_ops(backend: str) -> ModuleType:
    """The row-kernel module (`row_stats`, `row_grad`, `logprobs_and_grad_`) for `backend` ("triton" or "torch"),
    imported on first use, so that triton is imported only where the Triton kernels run."""
    if backend == "triton":
        from grpo_fast.kernels import rowwise_triton

        return rowwise_triton
    from grpo_fast.kernels import rowwise_torch

    return rowwise_torch
