"""Bad input gets a ValueError that names the argument, on every backend; the backend switch itself is checked."""

import pytest
import torch

from grpo_fast.kernels import (
    backend,
    fused_linear_grpo_loss,
    fused_linear_logprobs,
    group_advantages,
    grpo_loss,
    resolve_backend,
    selective_logprobs,
    use_backend,
)

ALL_BACKENDS = ("triton", "torch", "reference")
H, W, T = torch.randn(2, 3, 4), torch.randn(11, 4), torch.randint(0, 11, (2, 3))


@pytest.mark.parametrize("be", ALL_BACKENDS)
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0, 5])), "targets out of range"),
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0, -1])), "targets out of range"),
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0, 1, 2])), "targets has shape"),
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0.0, 1.0])), "targets must be an integer"),
        (lambda: selective_logprobs(torch.randint(0, 3, (2, 5)), torch.tensor([0, 1])), "logits must be a floating"),
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), temperature=0.0), "temperature"),
        (lambda: fused_linear_logprobs(H.long(), W, T), "hidden must be a floating"),
        (lambda: fused_linear_logprobs(H, W[:, :3], T), "hidden's last dim"),
        (lambda: fused_linear_logprobs(H, W, T, bias=torch.zeros(10)), "bias must have shape"),
        (lambda: fused_linear_logprobs(H, W, T + 11), "targets out of range"),
        (lambda: fused_linear_logprobs(H, W.view(-1), T), "weight must be the lm_head"),
        (lambda: group_advantages(torch.rand(6), 4), "group_size \\(4\\) must divide"),
        (lambda: group_advantages(torch.rand(6), 0), "group_size must be a positive"),
        (lambda: group_advantages(torch.rand(6), 3, scale="seq"), "scale must be one of"),
        (lambda: group_advantages(torch.rand(6, 2), 3, weights=torch.ones(3)), "weights must have shape"),
        (lambda: group_advantages(torch.rand(6), 3, weights=torch.ones(3)), "weights are for"),
        (lambda: group_advantages(torch.arange(6), 3), "rewards must be a floating"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 4)), "mask has shape"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(3), torch.ones(2, 3)), "advantages must be"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), loss_type="ppo"),
         "loss_type must be one of"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3),
                           importance_sampling_level="seq"), "importance_sampling_level"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), beta=0.1),
         "ref_logp is required"),
        (lambda: grpo_loss(torch.randn(2, 3), torch.randn(3, 2), None, torch.randn(2), torch.ones(2, 3)),
         "old_logp has shape"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), loss_type="dr_grpo",
                           max_completion_length=0), "max_completion_length"),
        (lambda: fused_linear_grpo_loss(H, W, T, torch.ones(2, 3), torch.randn(3)), "advantages must be"),
        (lambda: fused_linear_grpo_loss(H.int(), W, T, torch.ones(2, 3), torch.randn(2)), "hidden must be a float"),
        (lambda: fused_linear_grpo_loss(H, W, T, torch.ones(2, 2), torch.randn(2)), "mask has shape"),
        (lambda: fused_linear_grpo_loss(H, W, torch.full((2, 3), -1), torch.ones(2, 3), torch.randn(2)),
         "targets out of range"),
        (lambda: fused_linear_grpo_loss(H, W, T, torch.ones(2, 3), torch.randn(2), loss_type="x"), "loss_type"),
    ],
)
def test_bad_input_names_the_argument(be, call, match):
    with use_backend(be), pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("be", ["triton", "torch"])
def test_bad_chunk_size(be):
    with use_backend(be), pytest.raises(ValueError, match="chunk_size must be a positive"):
        fused_linear_logprobs(H, W, T, chunk_size=0)


def test_fused_loss_needs_sequences():
    with use_backend("torch"), pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        fused_linear_grpo_loss(H[0], W, T[0], torch.ones(3), torch.randn(3))


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("GRPO_FAST_BACKEND", raising=False)
    assert resolve_backend(cpu) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("GRPO_FAST_BACKEND", "reference")
    assert resolve_backend(cpu) == "reference"
    with use_backend("torch"):  # the override wins over the variable
        assert resolve_backend(cpu) == "torch"
    monkeypatch.setenv("GRPO_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="GRPO_FAST_BACKEND must be one of"):
        resolve_backend(cpu)
    with pytest.raises(ValueError, match="backend must be one of"), use_backend("fast"):
        pass


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "TRITON_INTERPRET", False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"))
