"""Shared helpers for the kernel tests: backends under test and the error rule."""

from __future__ import annotations

import torch

# every non-reference backend is checked against grpo_fast.kernels.reference
BACKENDS = ("triton", "torch")

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
