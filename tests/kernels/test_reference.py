"""The reference's own edge cases: it is the ground truth, so its gradients must be finite wherever the true ones
are."""

import torch

from grpo_fast.kernels import reference


def test_entropy_gradient_is_finite_for_large_logits(device):
    # logits of +-80: exp(-160) underflows to 0 in fp32, where entr(p)'s gradient -(log p + 1) is +inf and the
    # softmax backward multiplies it by p = 0. The true gradient, d H / d z_j = -p_j (log p_j + H), is ~0 there.
    logits = torch.tensor([[80.0, -80.0, 79.0, -float("inf")], [0.0, 1.0, -80.0, 80.0]], requires_grad=True)
    entropy = reference.entropy_from_logits(logits)
    entropy.sum().backward()
    assert torch.isfinite(entropy).all() and torch.isfinite(logits.grad).all()
    z = logits.detach().double()
    p = torch.softmax(z, -1)
    logp = torch.where(p > 0, torch.log_softmax(z, -1), 0.0)
    h = -(p * logp).sum(-1, keepdim=True)
    torch.testing.assert_close(entropy.double(), h.squeeze(-1))
    torch.testing.assert_close(logits.grad.double(), -p * (logp + h))
