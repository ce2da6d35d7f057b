"""The check the one-step tests share: a trainer step's gradients equal a hand-built reference step's."""

from __future__ import annotations

import torch


def assert_same_gradients(model: torch.nn.Module, reference_model: torch.nn.Module) -> None:
    """Every parameter's `.grad` of `model` (the trainer's step) equals that of `reference_model` (the same weights,
    backward through the reference loss) within 1e-3 relative; at least one gradient is non-zero."""
    grads = {n: p.grad for n, p in reference_model.named_parameters()}
    for name, p in model.named_parameters():
        if grads[name] is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-6, msg=name)
    assert any(g is not None and g.abs().max() > 0 for g in grads.values())
