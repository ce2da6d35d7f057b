"""group_advantages: hand-computed groups, NaN handling, every scale mode, weighted rewards, TRL's nanstd; the
triton and torch backends against the reference, which neither may call."""

import math

import pytest
import torch

from grpo_fast.kernels import group_advantages, reference, use_backend
from tests.kernels.utils import BACKENDS, generator

ALL_BACKENDS = (*BACKENDS, "reference")
NAN = float("nan")


def _adv(backend, rewards, group_size, **kwargs):
    with use_backend(backend):
        return group_advantages(torch.tensor(rewards), group_size, **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_group_scale_by_hand(device, backend):
    # group [1, 2, 3, 4]: mean 2.5, unbiased std sqrt(5/3) = 1.29099 -> (r - 2.5) / (1.29099 + 1e-4)
    std = math.sqrt(5 / 3) + 1e-4
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std
    torch.testing.assert_close(_adv(backend, [1.0, 2.0, 3.0, 4.0], 4), expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_equal_rewards_give_zero_not_nan(device, backend):
    adv = _adv(backend, [0.6, 0.6, 0.6, 1.0, 1.0, 1.0], 3)
    assert torch.equal(adv, torch.zeros(6))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_rewards_are_left_out(device, backend):
    # group [1, NaN, 3, 3]: valid [1, 3, 3], mean 7/3, unbiased std sqrt(((4/3)^2 + 2 (2/3)^2) / 2) = sqrt(4/3)
    std = math.sqrt(4 / 3) + 1e-4
    expected = torch.tensor([(1 - 7 / 3) / std, 0.0, (3 - 7 / 3) / std, (3 - 7 / 3) / std])
    adv = _adv(backend, [1.0, NAN, 3.0, 3.0], 4)
    torch.testing.assert_close(adv, expected)
    # a group with a single valid reward: its advantage is 0 (and the NaN one too), no NaN anywhere
    assert torch.equal(_adv(backend, [NAN, 0.8, NAN, NAN], 4), torch.zeros(4))
    assert torch.equal(_adv(backend, [NAN, NAN], 2), torch.zeros(2))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_and_none_scales_by_hand(device, backend):
    rewards = [0.0, 1.0, 0.0, 0.0]  # groups of 2: means 0.5 and 0
    # batch: all four rewards have mean 0.25, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    torch.testing.assert_close(_adv(backend, rewards, 2, scale="batch"),
                               torch.tensor([-0.5, 0.5, 0.0, 0.0]) / (0.5 + 1e-4))
    torch.testing.assert_close(_adv(backend, rewards, 2, scale="none"), torch.tensor([-0.5, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weighted_reward_functions(device, backend):
    # K = 2 reward functions, weights [1, 0.5]: row sums [1, 1.5, 0.5 (NaN skipped), NaN (all NaN: unscorable)]
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [NAN, 1.0], [NAN, NAN]])
    with use_backend(backend):
        adv = group_advantages(rewards, 4, scale="none", weights=torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.5, -0.5, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 5, 16])
def test_matches_reference(device, monkeypatch, backend, scale, group_size):
    g = generator(group_size)
    rewards = torch.rand(group_size * 6, generator=g)
    rewards[torch.rand(rewards.shape, generator=g) < 0.2] = NAN
    rewards[:group_size] = 0.8  # one all-equal group
    with use_backend("reference"):
        expected = group_advantages(rewards, group_size, scale=scale)
    # the backend is its own implementation: it never hands the work to the reference it is compared with
    monkeypatch.setattr(reference, "group_advantages", None)
    with use_backend(backend):
        adv = group_advantages(rewards, group_size, scale=scale)
    assert not torch.isnan(adv).any()
    torch.testing.assert_close(adv, expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_trl_without_nan(device, backend):
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    rewards = torch.rand(24, generator=generator(0))
    groups = rewards.view(-1, 4)
    expected = (groups - groups.mean(1, keepdim=True)) / (nanstd(groups, dim=1, keepdim=True) + 1e-4)
    torch.testing.assert_close(_adv(backend, rewards.tolist(), 4), expected.view(-1))
