"""grpo_loss: every branch pinned by a hand-computed case, each backend against the reference, and parity with
TRL's own `GRPOTrainer._compute_loss` run on the same inputs."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from grpo_fast.kernels import grpo_loss, reference, use_backend
from tests.kernels.utils import BACKENDS, generator

ALL_BACKENDS = (*BACKENDS, "reference")


def _one_token(backend, ratio, adv, **kwargs):
    """Loss and d loss / d logp for a single valid token whose ratio to the old policy is `ratio`."""
    logp = torch.tensor([[-1.0]], requires_grad=True)
    old = logp.detach() - math.log(ratio)
    with use_backend(backend):
        loss, metrics = grpo_loss(logp, old, None, torch.tensor([adv]), torch.ones(1, 1), **kwargs)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "ratio, adv, delta, loss, grad, low, high",
    [
        # A > 0, r = 1.5 above 1 + eps = 1.2: min(1.5, 1.2) = 1.2 -> loss -1.2, clipped branch -> no gradient
        (1.5, 1.0, None, -1.2, 0.0, 0.0, 1.0),
        # A < 0, r = 0.5 below 1 - eps = 0.8: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped -> no gradient
        (0.5, -1.0, None, 0.8, 0.0, 1.0, 0.0),
        # A > 0, r = 0.5: min(0.5, 0.8) = 0.5 is the unclipped branch -> loss -0.5, d/dlogp = -A r = -0.5
        (0.5, 1.0, None, -0.5, -0.5, 0.0, 0.0),
        # A < 0, r = 1.5: min(-1.5, -1.2) = -1.5 unclipped -> loss 1.5, d/dlogp = -A r = 1.5
        (1.5, -1.0, None, 1.5, 1.5, 0.0, 0.0),
        # inside the trust region, r = 1.1, A = 2: loss -2.2, d/dlogp = -2.2
        (1.1, 2.0, None, -2.2, -2.2, 0.0, 0.0),
        # delta caps the unclipped branch: r = 3, A = -1, delta = 2 -> min(-2, -1.2) = -2 -> loss 2, capped -> 0
        (3.0, -1.0, 2.0, 2.0, 0.0, 0.0, 0.0),
        # the same without delta: min(-3, -1.2) = -3 -> loss 3, d/dlogp = 3
        (3.0, -1.0, None, 3.0, 3.0, 0.0, 0.0),
    ],
)
def test_clipping_by_hand(device, backend, ratio, adv, delta, loss, grad, low, high):
    value, d_logp, metrics = _one_token(backend, ratio, adv, delta=delta)
    assert value == pytest.approx(loss, abs=1e-5)
    assert d_logp == pytest.approx(grad, abs=1e-5)
    assert metrics["clip_ratio/low_mean"].item() == low
    assert metrics["clip_ratio/high_mean"].item() == high
    assert metrics["clip_ratio/region_mean"].item() == max(low, high)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_epsilon_high_widens_the_upper_clip(device, backend):
    # r = 1.25 with eps_low 0.2: clipped at 1.2 by default (loss -1.2), inside with epsilon_high 0.28 (loss -1.25)
    assert _one_token(backend, 1.25, 1.0)[0] == pytest.approx(-1.2, abs=1e-5)
    assert _one_token(backend, 1.25, 1.0, epsilon_high=0.28)[0] == pytest.approx(-1.25, abs=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_kl_by_hand(device, backend):
    logp = torch.tensor([[-2.0, -1.0]], requires_grad=True)
    adv, mask = torch.tensor([0.0]), torch.ones(1, 2)
    with use_backend(backend):
        # ref == logp: k3 KL is exactly 0 and beta changes nothing (the plain k3 KL; its importance-weighted form
        # is pinned in test_loss_variants)
        loss, metrics = grpo_loss(logp, None, logp.detach(), adv, mask, beta=0.5, use_bias_correction_kl=False)
        assert loss.item() == 0.0 and metrics["kl"].item() == 0.0
        # ref - logp = log 2 at token 0, 0 at token 1: kl = [2 - log 2 - 1, 0] = [0.30685, 0]
        ref = logp.detach() + torch.tensor([[math.log(2.0), 0.0]])
        loss, metrics = grpo_loss(logp, None, ref, adv, mask, beta=0.5, use_bias_correction_kl=False)
    loss.backward()
    kl0 = 1.0 - math.log(2.0)
    assert metrics["kl"].item() == pytest.approx(kl0 / 2, abs=1e-6)
    # A = 0, so the loss is beta * mean kl = 0.5 * kl0 / 2; d kl/d logp = 1 - exp(ref - logp) = [-1, 0]
    assert loss.item() == pytest.approx(0.5 * kl0 / 2, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5 * -1.0 / 2, 0.0]]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (-1.0 + -2.0) / 2),  # per-sequence means (-1, -2), then their mean
        ("bnpo", (-1 - 1 - 2) / 3),  # sum over the 3 valid tokens / 3
        ("dapo", (-1 - 1 - 2) / 3),
        ("dr_grpo", (-1 - 1 - 2) / (2 * 4)),  # sum / (B * max_completion_length)
    ],
)
def test_loss_type_normalizers_by_hand(device, backend, loss_type, expected):
    # on-policy (ratio 1): each valid token contributes -A; sequence 0 has 2 valid tokens (A=1), sequence 1 one (A=2)
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with use_backend(backend):
        loss, _ = grpo_loss(logp, None, None, torch.tensor([1.0, 2.0]), mask, loss_type=loss_type,
                            max_completion_length=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# per-token losses [[1, 2, 3], [4, 5, 6]] (B = 2, T = 3); the valid tokens of each mask are listed per case
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
PARTIAL = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # valid: 1, 2 | 4
ONE_EMPTY = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # valid: 1, 2, 3 | none


@pytest.mark.parametrize(
    "mask, loss_type, max_len, expected",
    [
        (PARTIAL, "grpo", None, (1.5 + 4.0) / 2),  # sequence means (1 + 2) / 2 and 4 / 1, then their mean: 2.75
        (PARTIAL, "bnpo", None, 7 / 3),  # (1 + 2 + 4) / 3 valid tokens
        (PARTIAL, "dapo", None, 7 / 3),
        (PARTIAL, "dr_grpo", 4, 7 / 8),  # (1 + 2 + 4) / (B * max_completion_length) = 7 / (2 * 4)
        (PARTIAL, "dr_grpo", None, 7 / 6),  # max_completion_length defaults to T: 7 / (2 * 3)
        (ONE_EMPTY, "grpo", None, (2.0 + 0.0) / 2),  # means (1 + 2 + 3) / 3 = 2 and 0 for the empty one, over B = 2
        (ONE_EMPTY, "dapo", None, 6 / 3),  # (1 + 2 + 3) / 3 valid tokens
        (ONE_EMPTY, "dr_grpo", 5, 6 / 10),  # 6 / (2 * 5)
    ],
)
def test_reference_aggregation_by_hand(mask, loss_type, max_len, expected):
    loss = reference.aggregate_loss(PER_TOKEN, mask, loss_type, max_len)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (2.0 + 3.0) / 2),  # each sequence's mean is its own value: (2 + 3) / 2
        ("dapo", (2 + 2 + 3) / 3),  # 2 on both valid tokens of sequence 0, 3 on the one of sequence 1
        ("dr_grpo", (2 + 2 + 3) / (2 * 4)),
    ],
)
def test_reference_aggregation_broadcasts_a_value_per_sequence(loss_type, expected):
    # sequence level with beta = 0: one per-token loss per sequence, [B, 1] = [[2], [3]], over the PARTIAL mask
    loss = reference.aggregate_loss(torch.tensor([[2.0], [3.0]]), PARTIAL, loss_type, 4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sequence_level_ratio_by_hand(device, backend):
    # log-ratios [log 2, 0] -> sequence log-ratio log(2)/2 -> r = sqrt(2) = 1.414 for both tokens, A = 1
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = logp.detach() - torch.tensor([[math.log(2.0), 0.0]])
    args = (old, None, torch.tensor([1.0]), torch.ones(1, 2))
    with use_backend(backend):
        clipped, metrics = grpo_loss(logp, *args, importance_sampling_level="sequence")
        inside, _ = grpo_loss(logp, *args, importance_sampling_level="sequence", epsilon_high=0.5)
    assert clipped.item() == pytest.approx(-1.2, abs=1e-6)  # clipped at 1 + 0.2
    assert metrics["clip_ratio/high_mean"].item() == 1.0
    inside.backward()
    assert inside.item() == pytest.approx(-math.sqrt(2.0), abs=1e-6)
    # d/dlogp_t of -r A through the mean: -sqrt(2) * 1/2 for each token
    torch.testing.assert_close(logp.grad, torch.full((1, 2), -math.sqrt(2.0) / 2))


def _random_case(b=4, t=7, seed=0):
    g = generator(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0] = False  # a fully masked sequence
    return {
        "logp": logp,
        "old": logp + 0.3 * torch.randn(b, t, generator=g),
        "ref": logp + 0.3 * torch.randn(b, t, generator=g),
        "adv": torch.randn(b, generator=g),
        "mask": mask,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta, with_old, delta", [(0.0, False, None), (0.04, True, None), (0.04, True, 1.3)])
def test_matches_reference(device, backend, loss_type, level, beta, with_old, delta):
    case = _random_case()
    results = []
    for be in (backend, "reference"):
        logp = case["logp"].clone().requires_grad_()
        with use_backend(be):
            loss, metrics = grpo_loss(logp, case["old"] if with_old else None, case["ref"], case["adv"], case["mask"],
                                      beta=beta, epsilon_high=0.28, loss_type=loss_type, delta=delta,
                                      importance_sampling_level=level, max_completion_length=9)
        loss.backward()
        results.append((loss, metrics, logp.grad))
    (loss, metrics, grad), (ref_loss, ref_metrics, ref_grad) = results
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], ref_metrics[key], msg=key)


def _trl_loss(case, old, loss_type, level, beta, epsilon_high, delta, max_len):
    """TRL's own GRPOTrainer._compute_loss, run unbound on a stand-in trainer with these inputs."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    logp = case["logp"].clone().requires_grad_()
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x,
                                  gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=accelerator, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    b, t = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": case["mask"].long(),
        "advantages": case["adv"], "old_per_token_logps": old, "ref_per_token_logps": case["ref"],
        "num_items_in_batch": case["mask"].sum().float(),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss, trainer._metrics["train"], logp.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_parity_with_trl(device, backend, loss_type, level):
    case = _random_case(seed=3)
    case["mask"][0, 0] = True  # TRL's per-sequence clip logging divides by each sequence's length
    kw = {"beta": 0.04, "epsilon_high": 0.28, "delta": 1.5}
    trl_loss, trl_metrics, trl_grad = _trl_loss(case, case["old"], loss_type, level, max_len=9, **kw)
    logp = case["logp"].clone().requires_grad_()
    with use_backend(backend):
        loss, metrics = grpo_loss(logp, case["old"], case["ref"], case["adv"], case["mask"], loss_type=loss_type,
                                  importance_sampling_level=level, max_completion_length=9,
                                  use_bias_correction_kl=False, **kw)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(logp.grad, trl_grad)
    for key in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key][0], abs=1e-6), key
