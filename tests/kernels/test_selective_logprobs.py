"""selective_logprobs on each backend against the plain reference: values and d logits."""

import pytest
import torch

from grpo_fast.kernels import reference, selective_logprobs, use_backend
from tests.kernels.utils import BACKENDS, DTYPES, assert_close_to_ref


def _run(backend: str | None, logits: torch.Tensor, targets: torch.Tensor, temperature: float, grad: torch.Tensor):
    logits = logits.detach().clone().requires_grad_()
    with use_backend(backend):
        logp = selective_logprobs(logits, targets, temperature=temperature)
    (logp * grad).sum().backward()
    return logp, logits.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("shape, vocab", [((3, 47), 123), ((1, 1), 1003), ((2, 3), 151_936), ((5,), 4099)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(device, backend, dtype, atol, shape, vocab, temperature):
    torch.manual_seed(0)
    logits32 = torch.randn(*shape, vocab) * 4
    targets = torch.randint(0, vocab, shape)
    grad = torch.randn(shape)
    out, dlogits = _run(backend, logits32.to(dtype), targets, temperature, grad)
    ref64, dref64 = _run("reference", logits32.double(), targets, temperature, grad.double())
    ref, dref = _run("reference", logits32.to(dtype), targets, temperature, grad)
    assert out.dtype == torch.float32 and out.shape == shape
    assert dlogits.dtype == dtype and dlogits.shape == logits32.shape
    assert_close_to_ref(out, ref, ref64, atol, "logp")
    assert_close_to_ref(dlogits, dref, dref64, atol, "d logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_and_masked_vocab_stay_finite(device, backend):
    # a row with a huge logit (naive exp overflows) and a -inf logit (a banned token): logp stays exact
    logits = torch.tensor([[1000.0, 0.0, -float("inf"), 999.0]])
    targets = torch.tensor([3])
    with use_backend(backend):
        logp = selective_logprobs(logits, targets)
    # log softmax at 999 against {1000, 0, 999}: 999 - (1000 + log(1 + e^-1000 + e^-1)) = -1 - log(1 + e^-1)
    expected = -1.0 - torch.log1p(torch.exp(torch.tensor(-1.0)))
    # lse ~ 1000.31 is stored in fp32, whose spacing there is 6e-5: that bounds the error of logp = z - lse
    torch.testing.assert_close(logp, expected.reshape(1), atol=1e-4, rtol=0)
    assert torch.isfinite(logp).all()


def test_reference_formula_by_hand():
    # logits [0, log 3] -> p = [1/4, 3/4]; log p(target=1) = log 0.75
    logp = reference.selective_logprobs(torch.tensor([[0.0, torch.log(torch.tensor(3.0))]]), torch.tensor([1]))
    torch.testing.assert_close(logp, torch.log(torch.tensor([0.75])))
