"""The row kernels' numerics at the edges: a row whose first blocks are all masked (-inf), and an entropy whose
logits sit far from 0. Each backend is held to the same rule against the fp64 reference; the triton backend runs
with the interpreter's wide blocks and with the GPU's launch configuration (4096-wide blocks)."""

import pytest
import torch

from grpo_fast.kernels import fused_linear_logprobs, reference, selective_logprobs, use_backend
from grpo_fast.kernels.interpreter import TRITON_INTERPRET
from tests.kernels.utils import DTYPES, assert_close_to_ref, generator, use_gpu_blocks

# (backend, launch configuration of the triton row kernels); without the interpreter only the GPU's exists
RUNS = [("triton", "gpu-blocks"), ("torch", None)]
if TRITON_INTERPRET:
    RUNS.insert(0, ("triton", "wide-blocks"))


def _exact_logits_inputs(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """fused_linear_logprobs inputs whose GEMM reproduces `logits [R, V]` exactly, so that any error is the row
    kernels' own: one-hot hidden rows [1, R, R] against weight = the finite logits, transposed; a column that is
    -inf in every row goes to the bias (a -inf weight would meet the one-hot's zeros: 0 * -inf = NaN)."""
    rows = logits.shape[0]
    banned = torch.isinf(logits).all(0)
    return {"hidden": torch.eye(rows, dtype=logits.dtype).unsqueeze(0),
            "weight": torch.where(banned, 0.0, logits).t().contiguous(),
            "bias": torch.where(banned, -float("inf"), 0.0).to(logits.dtype)}


def _logprobs_entropy_and_grads(backend, inputs, targets, grad_logp, grad_entropy):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with use_backend(backend):
        logp, entropy = fused_linear_logprobs(**leaves, targets=targets, return_entropy=True)
    ((logp * grad_logp).sum() + (entropy * grad_entropy).sum()).backward()
    return logp, entropy, leaves["weight"].grad


@pytest.mark.parametrize("backend, blocks", RUNS)
@pytest.mark.parametrize("vocab, masked", [(140_000, 70_000), (20_000, 5_000)])
def test_masked_start_of_the_vocabulary(monkeypatch, device, backend, blocks, vocab, masked):
    # the first `masked` logits of each row are -inf (banned tokens): 70,000 fill the interpreter's first 65,536-wide
    # block, 5,000 the GPU's first 4096-wide one, where exp(-inf - -inf) made the row NaN
    if blocks == "gpu-blocks":
        use_gpu_blocks(monkeypatch)
    g = generator(0)
    logits = torch.randn(2, vocab, generator=g) * 3
    logits[:, :masked] = -float("inf")
    targets = torch.randint(masked, vocab, (1, 2), generator=g)
    grads = torch.randn(1, 2, generator=g), torch.randn(1, 2, generator=g)
    inputs = _exact_logits_inputs(logits)
    logp, entropy, d_weight = _logprobs_entropy_and_grads(backend, inputs, targets, *grads)
    ref_logp, ref_entropy, ref_d_weight = _logprobs_entropy_and_grads("reference", inputs, targets, *grads)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(d_weight).all()
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d_weight, ref_d_weight, atol=1e-6, rtol=1e-5)
    with use_backend(backend):
        torch.testing.assert_close(selective_logprobs(logits, targets[0]), ref_logp[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend, blocks", RUNS)
@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_entropy_within_torch_error(monkeypatch, device, backend, blocks, dtype, atol, offset):
    # logits around `offset`: lse ~ offset, so H = lse - E_p[z] loses the digits of lse (fp32 spacing at 1000 is
    # 6e-5, against torch's ~1e-6 error here); the shifted form log s + E_p[m - z] does not
    if blocks == "gpu-blocks":
        use_gpu_blocks(monkeypatch)
    g = generator(1)
    logits = (torch.randn(3, 9000, generator=g) * 4 + offset).to(dtype)
    targets = torch.randint(0, 9000, (1, 3), generator=g)
    inputs = _exact_logits_inputs(logits)
    with use_backend(backend):
        _, entropy = fused_linear_logprobs(**inputs, targets=targets, return_entropy=True)
    ref = reference.entropy_from_logits(logits)
    ref64 = reference.entropy_from_logits(logits.double())
    assert_close_to_ref(entropy[0], ref, ref64, atol, "entropy")


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_gpu_launch_configuration_matches_reference(monkeypatch, device, backend, dtype, atol):
    # a 151,936 row in the GPU's 4096-wide blocks (37 of them, the last one partial): values and d logits
    use_gpu_blocks(monkeypatch)
    g = generator(2)
    logits32 = torch.randn(3, 151_936, generator=g) * 4
    targets, grad = torch.randint(0, 151_936, (3,), generator=g), torch.randn(3, generator=g)

    def run(backend, logits):
        logits = logits.detach().clone().requires_grad_()
        with use_backend(backend):
            logp = selective_logprobs(logits, targets, temperature=0.7)
        (logp * grad).sum().backward()
        return logp, logits.grad

    out, d_logits = run(backend, logits32.to(dtype))
    ref, d_ref = run("reference", logits32.to(dtype))
    ref64, d_ref64 = run("reference", logits32.double())
    assert_close_to_ref(out, ref, ref64, atol, "logp")
    assert_close_to_ref(d_logits, d_ref, d_ref64, atol, "d logits")
