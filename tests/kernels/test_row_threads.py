"""The CPU row ops' thread setting (`rowwise_torch.set_row_threads`): torch's thread count changes inside the row ops
only, comes back after them (an exception included), follows torch's count when not fixed, and the results
agree across settings within fp32 tolerance."""

import pytest
import torch

from grpo_fast.kernels import fused_linear_grpo_loss, fused_linear_logprobs, lm_head, rowwise_torch, use_backend
from tests.kernels.utils import generator

TORCH_THREADS = 3  # neither 1 nor 2, so that a count seen inside the row ops can only come from the setting


@pytest.fixture(autouse=True)
def _threads():
    """torch at TORCH_THREADS intra-op threads and the row-thread setting as it was, both restored after."""
    torch_threads, row_threads = torch.get_num_threads(), rowwise_torch.get_row_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(torch_threads)
    rowwise_torch.set_row_threads(row_threads)


def _inputs(b=2, t=15, d=8, v=40_000):
    g = generator(0)
    return {"hidden": torch.randn(b, t, d, generator=g), "weight": torch.randn(v, d, generator=g) / d**0.5,
            "targets": torch.randint(0, v, (b, t), generator=g), "advantages": torch.randn(b, generator=g),
            "mask": torch.ones(b, t, dtype=torch.bool)}


def _spy(monkeypatch, seen: dict[str, list[int]]) -> None:
    """Record torch's thread count in each row op (at its `_cpp_rows` call, which picks the C++ kernels or the torch
    fallback) and in each chunk's d hidden / d weight GEMMs (`GradBuffers.add_chunk`)."""
    cpp_rows, add_chunk = rowwise_torch._cpp_rows, lm_head.GradBuffers.add_chunk

    def spying_cpp_rows(*args):
        seen["row ops"].append(torch.get_num_threads())
        return cpp_rows(*args)

    def spying_add_chunk(self, *args):
        seen["gemms"].append(torch.get_num_threads())
        return add_chunk(self, *args)

    monkeypatch.setattr(rowwise_torch, "_cpp_rows", spying_cpp_rows)
    monkeypatch.setattr(lm_head.GradBuffers, "add_chunk", spying_add_chunk)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_change_inside_the_row_ops_only(monkeypatch, threads):
    rowwise_torch.set_row_threads(threads)
    seen = {"row ops": [], "gemms": []}
    _spy(monkeypatch, seen)
    x = _inputs()
    hidden, weight = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    with use_backend("torch"):
        loss, _ = fused_linear_grpo_loss(hidden, weight, x["targets"], None, None, x["advantages"], x["mask"],
                                         chunk_size=16, entropy_coef=0.01)  # logprobs_and_grad_, 2 chunks
        loss.backward()
        with torch.no_grad():
            fused_linear_logprobs(x["hidden"], x["weight"], x["targets"], chunk_size=16)  # row_stats
        logp = fused_linear_logprobs(hidden, weight, x["targets"], chunk_size=16)
        logp.sum().backward()  # row_grad
    assert seen["row ops"] == [threads] * 8  # 2 chunks in each of the 4 passes
    assert seen["gemms"] == [TORCH_THREADS] * 4
    assert torch.get_num_threads() == TORCH_THREADS


def test_threads_restored_after_an_exception():
    rowwise_torch.set_row_threads(1)
    logits = torch.randn(4, 100)

    def failing_dlogp(start, end, logp, entropy):
        assert torch.get_num_threads() == 1
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        rowwise_torch.logprobs_and_grad_(logits, torch.zeros(4, dtype=torch.long), 1.0, failing_dlogp)
    assert torch.get_num_threads() == TORCH_THREADS


def test_the_default_follows_torch_and_a_fixed_count_wins():
    rowwise_torch.set_row_threads(None)
    assert rowwise_torch.row_threads_now() == TORCH_THREADS
    torch.set_num_threads(2)
    assert rowwise_torch.row_threads_now() == 2  # torch's count now, whatever it was when the setting was made
    rowwise_torch.set_row_threads(1)
    assert rowwise_torch.row_threads_now() == 1


def test_setting_rejects_zero():
    with pytest.raises(ValueError, match="row threads must be >= 1"):
        rowwise_torch.set_row_threads(0)


def _loss_and_grads(threads, x, **kwargs):
    rowwise_torch.set_row_threads(threads)
    hidden, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    with use_backend("torch"):
        loss, metrics = fused_linear_grpo_loss(hidden, weight, x["targets"], None, x["ref_logp"], x["advantages"],
                                               x["mask"], beta=0.04, chunk_size=16, **kwargs)
        loss.backward()
    return loss, metrics["entropy"], hidden.grad, weight.grad


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_same_results_on_one_and_several_threads(entropy_coef):
    # 40,000 logits a row: 13 rows a block, so the 16-row chunks span two blocks and torch splits each op of a block
    # over the threads (reductions then sum in another order)
    x = _inputs()
    with torch.no_grad():
        x["ref_logp"] = fused_linear_logprobs(x["hidden"], x["weight"], x["targets"]) - 0.1
    one = _loss_and_grads(1, x, entropy_coef=entropy_coef)
    several = _loss_and_grads(TORCH_THREADS, x, entropy_coef=entropy_coef)
    for name, a, b in zip(("loss", "entropy", "d hidden", "d weight"), one, several):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
