"""Comparisons that only a GPU can make: the Triton kernels and cuBLAS at a model's shape (too slow for the
interpreter), and which `d weight` accumulation this GPU's torch gets. Skipped on CPU-only machines."""

import pytest
import torch

from grpo_fast.kernels import fused_linear_grpo_loss, lm_head, use_backend
from tests.kernels.utils import assert_close_to_ref, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]


def _loss_and_grads(backend, hidden, weight, targets, adv, mask, **kwargs):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with use_backend(backend):
        loss, metrics = fused_linear_grpo_loss(hidden, weight, targets, None, None, adv, mask, **kwargs)
    loss.backward()
    return [loss, metrics["entropy"], hidden.grad, weight.grad]


@pytest.mark.parametrize("dtype, compute_dtype", [(torch.bfloat16, None), (torch.float32, torch.bfloat16),
                                                  (torch.float32, None)])
def test_triton_on_the_gpu_at_a_model_shape(dtype, compute_dtype):
    # Qwen2-0.5B's lm_head (D 896, V 151,936) over 1,024 completion tokens, in the GPU's real launch configuration
    g = torch.Generator(device="cuda").manual_seed(0)
    b, t, d, v = 4, 256, 896, 151_936
    hidden = torch.randn(b, t, d, device="cuda", generator=g)
    weight = torch.randn(v, d, device="cuda", generator=g) / d**0.5 * 3
    targets = torch.randint(0, v, (b, t), device="cuda", generator=g)
    adv, mask = torch.randn(b, device="cuda", generator=g), torch.ones(b, t, device="cuda")
    args = (targets, adv, mask)
    out = _loss_and_grads("triton", hidden.to(dtype), weight.to(dtype), *args, compute_dtype=compute_dtype)
    ref = _loss_and_grads("reference", hidden.to(dtype), weight.to(dtype), *args, compute_dtype=compute_dtype)
    ref64 = _loss_and_grads("reference", hidden.double(), weight.double(), *args)
    atol = 1e-6 if (compute_dtype or dtype) == torch.float32 else 1e-3
    for name, o, r, r64 in zip(("loss", "entropy", "d hidden", "d weight"), out, ref, ref64):
        assert o.dtype == r.dtype, name
        assert_close_to_ref(o, r, r64, atol, name)


def test_which_weight_gradient_accumulation_this_torch_gets():
    # either path is exact; this records which one runs here (the bf16 GEMM with fp32 output is the fast one)
    lm_head.fp32_out_addmm.cache_clear()
    fast = lm_head.fp32_out_addmm("cuda")
    print(f"torch {torch.__version__}: d weight accumulates by "
          f"{'addmm(out_dtype=float32), bf16 GEMMs' if fast else 'fp32 GEMMs of upcast operands'}")
    a, b = torch.randn(256, 64, device="cuda").bfloat16(), torch.randn(64, 128, device="cuda").bfloat16()
    acc = torch.empty(256, 128, device="cuda")
    lm_head.accumulate_mm_(acc, a, b, first=True)
    lm_head.accumulate_mm_(acc, a, b, first=False)
    torch.testing.assert_close(acc.double(), 2 * a.double() @ b.double(), atol=1e-4, rtol=1e-5)
