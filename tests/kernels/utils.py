"""Shared helpers for the kernel tests: backends and devices under test, and the error rule."""

from __future__ import annotations

import pytest
import torch

# every non-reference backend is checked against grpo_fast.kernels.reference
BACKENDS = ("triton", "torch")

# tests that take the `device` fixture (tests/kernels/conftest.py) run on each: CPU always, CUDA when present
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

# a comparison that only a GPU can make (real Triton launches, cuBLAS paths): skipped on CPU-only machines
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU-only comparison: needs a CUDA GPU")


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the test's device (the default device that the `device` fixture sets): draws land
    there. CPU and CUDA draw different numbers from one seed, which the comparisons here do not depend on."""
    return torch.Generator(torch.get_default_device()).manual_seed(seed)


def use_gpu_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the triton row kernels with the GPU's launch configuration (4096-wide blocks, so a 150k row takes ~37
    blocks) instead of the interpreter's 65,536-wide ones, for the rest of the test."""
    from grpo_fast.kernels import rowwise_triton

    monkeypatch.setattr(rowwise_triton, "max_block", rowwise_triton.GPU_MAX_BLOCK)

# dtype and the absolute slack (relative to the largest |value|) added to the error rule below
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)]


def assert_close_to_ref(out: torch.Tensor, ref_same_dtype: torch.Tensor, ref_fp64: torch.Tensor, atol: float,
                        name: str) -> None:
    """The kernel may be at most twice as wrong as PyTorch's plain formula in the same dtype, measured against the
    fp64 reference in max-abs norm: `|out - ref64| <= 2 |ref - ref64| + atol * max(1, |ref64|)`.

    A fixed fp32 tolerance would not do: a 150k-vocab softmax in fp32 is off by ~1e-4 of its scale whatever the
    summation order, and a bf16 one by ~1e-2.
    """
    out, ref_same_dtype, ref_fp64 = out.double(), ref_same_dtype.double(), ref_fp64.double()
    assert out.shape == ref_fp64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}"
    scale = max(1.0, ref_fp64.abs().max().item()) if ref_fp64.numel() else 1.0
    err = (out - ref_fp64).abs().max().item() if out.numel() else 0.0
    torch_err = (ref_same_dtype - ref_fp64).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * torch_err + atol * scale, (
        f"{name}: error {err:.3g} > 2 x PyTorch's {torch_err:.3g} + {atol * scale:.3g}"
    )
