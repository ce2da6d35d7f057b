"""The loss variants in the trainer: a step with cispo, the entropy bonus and the top-entropy mask against a
full-logits reference step, the adaptive entropy coefficient, GDPO advantages, and the top-entropy quantile over
two ranks."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_fast.config import build_config
from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.kernels import group_advantages, high_entropy_mask, reference
from grpo_fast.models import load_policy
from grpo_fast.trainer import GRPOTrainer
from grpo_fast.trainer.entropy import EntropyControl, global_entropy_mask
from tests.trainer.gradients import assert_same_gradients
from tests.trainer.rewards import varied_reward

CPU = DistEnv(0, 1, torch.device("cpu"))


def length_reward(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def _config(**overrides):
    return build_config({"batch_size": 8, "num_generations": 4, "max_completion_length": 8, "warm_start": False,
                         "torch_threads": 1, "max_grad_norm": 0.0, "beta": 0.0, **overrides})


def test_entropy_control_follows_trl():
    control = EntropyControl(0.01, adaptive=True, coef_min=0.0, coef_max=0.02, delta=0.005, target=1.0)
    assert control.applied() == 0.0  # no entropy measured yet: TRL starts from inf, above any target
    control.update(0.5)  # at or below the target: more bonus, and it applies
    assert (control.coef, control.applied()) == (0.015, 0.015)
    control.update(0.9)
    assert control.coef == 0.02  # capped at coef_max
    control.update(1.5)  # above: less bonus, and none applied
    assert (control.coef, control.applied()) == (0.015, 0.0)
    for _ in range(5):
        control.update(2.0)
    assert control.coef == 0.0  # floored at coef_min
    restored = EntropyControl(0.3, adaptive=True)
    restored.load_state_dict(control.state_dict())
    assert (restored.coef, restored.last_entropy) == (0.0, 2.0)
    fixed = EntropyControl(0.1)
    fixed.update(0.0)
    assert (fixed.coef, fixed.applied()) == (0.1, 0.1)  # not adaptive: a constant


def test_one_step_with_the_variants_matches_a_full_logits_reference_step(synthetic_data):
    """Two micro-batches, cispo with the importance-weighted KL, an entropy bonus on the top-entropy tokens: the
    trainer's gradient equals autograd through the model's full logits and the reference loss formula."""
    options = {"loss_type": "cispo", "epsilon_high": 5.0, "beta": 0.1, "use_bias_correction_kl": True,
               "entropy_coef": 0.05, "top_entropy_quantile": 0.5}
    cfg = _config(gradient_accumulation_steps=2, temperature=0.7, **options)
    policy = load_policy("tiny", seed=0)
    ref_model = copy.deepcopy(policy.model).requires_grad_(False)
    with torch.no_grad():  # make the reference differ from the policy so the KL term has a gradient
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    start = copy.deepcopy(policy.model)
    trainer = GRPOTrainer(cfg, policy, load_seed(synthetic_data / "train.jsonl"), CPU, reward_funcs=[varied_reward],
                          ref_model=ref_model)
    stats, rollouts = trainer.train_step()

    total_tokens = sum(float(r.batch.completion_mask.sum()) for r in rollouts)
    loss = 0.0
    for r in rollouts:
        b = r.batch
        width = b.completion_ids.shape[1]
        logits = [m(**b.model_inputs()).logits[:, -width - 1 : -1].float() for m in (start, ref_model)]
        logp, ref_logp = (torch.log_softmax(z / 0.7, -1).gather(-1, b.completion_ids.unsqueeze(-1)).squeeze(-1)
                          for z in logits)
        entropy = reference.entropy_from_logits(logits[0], 0.7)
        part, _ = reference.grpo_loss(
            logp, None, ref_logp.detach(), r.advantages, b.completion_mask, loss_type="cispo", epsilon_high=5.0,
            beta=0.1, max_completion_length=8, entropy=entropy, entropy_coef=0.05,
            entropy_mask=high_entropy_mask(entropy, b.completion_mask, 0.5),
        )
        loss = loss + float(b.completion_mask.sum()) / total_tokens * part  # cispo: normalised by tokens
    loss.backward()
    assert math.isfinite(stats.loss) and stats.loss == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    assert stats.entropy_coef == 0.05 and math.isnan(stats.clip_ratio)  # cispo logs cispo_clip_ratio instead
    assert_same_gradients(policy.model, start)


@pytest.mark.parametrize("target, coef", [(100.0, 0.015), (0.0, 0.005)])
def test_adaptive_entropy_moves_the_coefficient_and_resumes(synthetic_data, tiny_policy, target, coef):
    # a tiny random model's entropy (~ log V nats) is below a target of 100 (bonus up) and above 0 (bonus down)
    cfg = _config(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=target)
    policy = copy.deepcopy(tiny_policy)
    trainer = GRPOTrainer(cfg, policy, load_seed(synthetic_data / "train.jsonl"), CPU, reward_funcs=[varied_reward])
    stats, _ = trainer.train_step()
    assert stats.entropy_coef == pytest.approx(coef) and trainer.entropy.last_entropy == pytest.approx(stats.entropy)
    state = trainer.state_dict()
    again = GRPOTrainer(cfg, copy.deepcopy(tiny_policy), [], CPU, reward_funcs=[varied_reward])
    again.load_state_dict(state)
    assert again.entropy.state_dict() == trainer.entropy.state_dict()


def test_normalize_then_sum_advantages_in_the_trainer(tiny_policy):
    cfg = _config(multi_objective_aggregation="normalize_then_sum")
    trainer = GRPOTrainer(cfg, tiny_policy, [], CPU, reward_funcs=[varied_reward, length_reward],
                          reward_weights=[1.0, 0.5])
    rewards = torch.tensor([[1.0, 0.0], [0.0, 10.0], [0.5, 2.0], [0.25, 1.0], [1.0, 5.0], [1.0, 5.0], [0.0, 1.0],
                            [float("nan"), 2.0]])
    expected = group_advantages(rewards, 4, weights=torch.tensor([1.0, 0.5]),
                                multi_objective_aggregation="normalize_then_sum")
    torch.testing.assert_close(trainer.compute_advantages(rewards), expected)
    assert not torch.allclose(expected, group_advantages(rewards, 4, weights=torch.tensor([1.0, 0.5])))


def _rank_entropies(rank):
    g = torch.Generator().manual_seed(rank)
    entropy = torch.rand(2, 5, generator=g) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2 + rank :] = False  # ranks hold different numbers of valid tokens (8 and 7)
    return entropy, mask


def _two_rank_worker(rank, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        entropy, mask = _rank_entropies(rank)
        out.put((rank, global_entropy_mask(entropy, mask, 0.3, DistEnv(rank, 2, torch.device("cpu"))).tolist()))
    finally:
        dist.destroy_process_group()


def test_top_entropy_quantile_is_taken_over_every_rank(tmp_path):
    context = mp.get_context("fork")  # a forked worker needs no fresh interpreter and imports
    out = context.SimpleQueue()
    workers = [context.Process(target=_two_rank_worker, args=(rank, str(tmp_path / "init"), out)) for rank in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    masks = {rank: torch.tensor(mask) for rank, mask in (out.get(), out.get())}
    cases = [_rank_entropies(rank) for rank in range(2)]
    pool = torch.cat([entropy[mask] for entropy, mask in cases])  # the 15 valid entropies of both ranks
    for rank, (entropy, mask) in enumerate(cases):
        assert torch.equal(masks[rank], high_entropy_mask(entropy, mask, 0.3, pool=pool)), rank
    # the global threshold differs from either rank's own
    assert any(not torch.equal(masks[r], high_entropy_mask(*cases[r], 0.3)) for r in range(2))
