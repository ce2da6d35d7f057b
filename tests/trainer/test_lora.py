"""LoRA (peft): a step trains only the adapters, the reference is the base model with adapters off, old log-probs
come from the policy before the update (num_iterations 2), and several weighted reward functions combine."""

import math

import pytest
import torch

from grpo_fast.config import build_config
from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.models import load_policy
from grpo_fast.rewards import JudgeReward, RuleJudge
from grpo_fast.trainer import GRPOTrainer
from grpo_fast.trainer.setup import build_policy

CPU = DistEnv(0, 1, torch.device("cpu"))


def length_reward(prompts, completions, **columns):
    """Longer is better, and the item's level is a column: a reward with signal even for a random model."""
    assert len(columns["level"]) == len(completions)
    return [None if i == 0 else len(c) / 10 for i, c in enumerate(completions)]  # the first: unscorable


def test_lora_step(synthetic_data):
    pytest.importorskip("peft")
    cfg = build_config(
        {
            "batch_size": 8,
            "num_generations": 4,
            "max_completion_length": 8,
            "lora": 4,
            "beta": 0.1,
            "num_iterations": 2,
            "learning_rate": 1e-2,
            "warm_start": False,
        }
    )
    policy, ref_model = build_policy(cfg, "tiny", CPU)
    assert ref_model is None  # the base model is the reference
    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    trainer = GRPOTrainer(
        cfg,
        policy,
        load_seed(synthetic_data / "train.jsonl"),
        CPU,
        reward_funcs=[length_reward, JudgeReward(RuleJudge())],
        reward_weights=[1.0, 0.5],
    )
    first, (r1,) = trainer.train_step()
    stats, (r,) = trainer.train_step()

    # base weights untouched, adapters moved
    assert all(torch.equal(p, frozen[n]) for n, p in policy.model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, adapters[n]) for n, p in policy.model.named_parameters() if n in adapters)
    # LoRA's B starts at zero: at the first step policy, old policy and base model agree
    base = load_policy("tiny", seed=cfg.seed).model
    torch.testing.assert_close(r1.old_logp, r1.ref_logp)
    # at the second the policy has moved, but the reference is still the base model
    torch.testing.assert_close(r.ref_logp, trainer.logprobs(base, r.batch))
    assert not torch.allclose(r.old_logp, r.ref_logp)
    assert first.kl > 0 and stats.kl > 0  # the first step's second iteration already saw a moved policy
    # rewards: one column per function, None -> NaN; the advantage of the unscorable row uses the other function
    assert r.rewards.shape == (8, 2) and math.isnan(r.rewards[0, 0]) and not math.isnan(r.rewards[1, 0])
    assert r.advantages.abs().sum() > 0
