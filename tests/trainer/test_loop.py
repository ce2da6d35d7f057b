"""The GRPO trainer on the tiny model: a CI run of the default path, one step against a full-logits reference step,
and exact resume."""

import copy
import json
import math
import shutil

import pytest
import torch

from grpo_fast.config import build_config
from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.kernels import reference
from grpo_fast.models import load_policy
from grpo_fast.models.inputs import collate
from grpo_fast.rewards import RuleJudge
from grpo_fast.train import main
from grpo_fast.trainer import GRPOTrainer
from tests.models.tiny_qwen_vl import save_tiny_qwen_vl
from tests.trainer.gradients import assert_same_gradients
from tests.trainer.rewards import varied_reward

CPU = DistEnv(0, 1, torch.device("cpu"))


@pytest.fixture
def train(tmp_path, tiny_run_flags):
    """`python -m grpo_fast.train` on a data folder with the tiny run flags (and more), into tmp_path/runs."""

    def run(data, *args):
        main(["--output-dir", str(tmp_path / "runs"), "--data", str(data), *tiny_run_flags, *args])

    return run


def test_default_path_writes_every_artifact(tmp_path, train, capsys, monkeypatch):
    # the embedded default, shrunk: data generated when absent, SFT warm start, GRPO, eval table
    monkeypatch.chdir(tmp_path)  # the default data folder, data/synthetic, is the one generated when absent
    train(
        "data/synthetic",
        "--synthetic-items",
        "24",
        "--sft-steps",
        "2",
        "--sft-vision-steps",
        "2",
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--save-total-limit",
        "1",
        "--name",
        "ci",
    )
    run = tmp_path / "runs/ci"
    out = capsys.readouterr().out
    assert "mean reward" in out and "strategy accuracy, ambig" in out and "factual pass rate" in out
    assert (tmp_path / "data/synthetic/train.jsonl").is_file()
    assert (tmp_path / "runs/warm-start/checkpoint/sft_config.json").is_file()
    cfg = build_config({}, run / "config.yaml")
    assert (cfg.max_steps, cfg.batch_size, cfg.sft_steps, cfg.sft_vision_steps) == (2, 8, 2, 2)
    assert json.loads((tmp_path / "runs/warm-start/checkpoint/sft_config.json").read_text())["vision_steps"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/reward" in r] == [0, 2]
    step = next(r for r in records if "reward" in r)
    for key in ("reward", "kl", "completion_length", "step_time", "entropy", "grad_norm", "lr", "loss"):
        assert isinstance(step[key], float)
    split = [step[f"time/{phase}"] for phase in ("generate", "reward", "logprobs", "update")]
    assert all(t >= 0 for t in split) and split[0] > 0 and sum(split) <= step["step_time"]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 and {"question", "completion", "rewards", "advantage"} <= samples[0].keys()
    assert (run / "reward_curve.png").stat().st_size > 5000
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # save_total_limit 1
    assert (run / "checkpoints/step-000002/trainer_state.pt").is_file()
    assert load_policy(run / "final").image_seq_length == 16
    # the warm start is reused by the next run with the same settings
    args = ("--synthetic-items", "24", "--sft-steps", "2", "--sft-vision-steps", "2", "--max-steps", "1")
    train("data/synthetic", *args, "--name", "ci2")
    assert "warm start: reusing" in capsys.readouterr().out


def _copy_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "model, loss_type",
    [("tiny", "dapo"), ("tiny", "grpo"), ("qwen2_vl", "dapo"), ("qwen2_5_vl", "grpo"), ("qwen3_vl", "dapo")],
)
def test_one_step_matches_a_full_logits_reference_step(synthetic_data, tmp_path, model, loss_type):
    """Two micro-batches with beta > 0, temperature 0.7: the trainer's gradient (fused kernel on hidden states, global
    normalisation) equals autograd through the model's full logits and the reference loss formula; for the tiny
    InternVL and for tiny random Qwen-VL checkpoints (3-D rope positions, image grids)."""
    cfg = build_config(
        {
            "batch_size": 8,
            "num_generations": 4,
            "gradient_accumulation_steps": 2,
            "max_completion_length": 8,
            "beta": 0.1,
            "temperature": 0.7,
            "max_grad_norm": 0.0,
            "loss_type": loss_type,
            "warm_start": False,
            "torch_threads": 1,
        }
    )
    items = load_seed(synthetic_data / "train.jsonl")
    policy = load_policy("tiny" if model == "tiny" else save_tiny_qwen_vl(tmp_path, model), seed=0)
    ref_model = copy.deepcopy(policy.model).requires_grad_(False)
    with torch.no_grad():  # make the reference differ from the policy so the KL term has a gradient
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    start = copy.deepcopy(policy.model)
    trainer = GRPOTrainer(cfg, policy, items, CPU, reward_funcs=[varied_reward], ref_model=ref_model)
    stats, rollouts = trainer.train_step()
    assert all(r.advantages.abs().max() > 0 for r in rollouts)

    total_tokens = sum(float(r.batch.completion_mask.sum()) for r in rollouts)
    loss = 0.0
    for r in rollouts:
        b = r.batch
        width = b.completion_ids.shape[1]
        logp, ref_logp = (
            torch.log_softmax(m(**b.model_inputs()).logits[:, -width - 1 : -1].float() / 0.7, -1)
            .gather(-1, b.completion_ids.unsqueeze(-1))
            .squeeze(-1)
            for m in (start, ref_model)
        )
        part, _ = reference.grpo_loss(
            logp,
            None,
            ref_logp.detach(),
            r.advantages,
            b.completion_mask,
            beta=0.1,
            loss_type=loss_type,
            max_completion_length=8,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
        )
        # global normalisation: dapo by all tokens of the step, grpo by all its sequences
        share = float(b.completion_mask.sum()) / total_tokens if loss_type == "dapo" else 0.5
        loss = loss + share * part
    loss.backward()
    assert math.isfinite(stats.loss) and stats.loss == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    assert_same_gradients(policy.model, start)
    moved = dict(start.named_parameters())
    assert any(not torch.equal(p, moved[name]) for name, p in policy.model.named_parameters())  # the update


def test_rollouts_are_whole_groups_with_eos_masks(synthetic_data):
    cfg = build_config(
        {"batch_size": 8, "num_generations": 4, "max_completion_length": 12, "beta": 0.0, "mask_zero_std_groups": False}
    )
    policy = load_policy("tiny", seed=0)
    trainer = GRPOTrainer(cfg, policy, load_seed(synthetic_data / "train.jsonl"), CPU, judge=RuleJudge())
    r = trainer.rollout(0, 0)
    assert [it["question"] for it in r.items[:4]] == [r.items[0]["question"]] * 4  # a group shares its prompt
    ids, mask, eos = r.batch.completion_ids, r.batch.completion_mask, policy.tokenizer.eos_token_id
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # the mask is a prefix
        assert (row[n:] == policy.tokenizer.pad_token_id).all()
        assert (row[: n - 1] != eos).all() and (row[n - 1] == eos or n == ids.shape[1])
    assert not torch.isin(ids, torch.tensor([policy.tokenizer.context_image_token_id])).any()
    # seeded per row: the same step samples the same completions, another step others
    assert torch.equal(trainer.rollout(0, 0).batch.completion_ids, ids)
    assert not torch.equal(trainer.rollout(1, 0).batch.completion_ids, ids)
    # the reward is the rubric's, the advantage the group's
    judged = RuleJudge().judge(r.items, r.texts)
    assert r.rewards.shape == (8, 1) and all(0 <= v <= 1 for v in r.rewards[:, 0].tolist())
    assert len(judged) == 8
    torch.testing.assert_close(r.advantages.view(2, 4).sum(1), torch.zeros(2), atol=1e-5, rtol=0)
    assert collate(policy, r.items[:1]).prompt_ids.shape[1] == r.batch.prompt_ids.shape[1]


def test_groups_of_equal_rewards_leave_the_loss(synthetic_data):
    """mask_zero_std_groups: the loss trains on the group whose rewards differ alone (its completions, mask and
    advantages as in the full batch); the logged lengths stay those of every sampled completion."""

    def half_flat(prompts, completions, **columns):  # group 0 all 0.5, group 1 varied
        return [0.5] * 4 + [float(i % 2) for i in range(4)]

    items = load_seed(synthetic_data / "train.jsonl")
    flags = {"batch_size": 8, "num_generations": 4, "max_completion_length": 12, "beta": 0.0}
    masked, full = (
        GRPOTrainer(
            build_config(flags | {"mask_zero_std_groups": on}), load_policy("tiny", seed=0), items, CPU,
            reward_funcs=[half_flat],
        )
        for on in (True, False)
    )
    r, r_full = masked.rollout(0, 0), full.rollout(0, 0)
    assert torch.equal(r.batch.completion_ids, r_full.batch.completion_ids)
    assert r_full.loss_rows is None and r.loss_rows.tolist() == [4, 5, 6, 7]
    batch, advantages = r.trained
    assert torch.equal(batch.completion_ids, r_full.batch.completion_ids[4:])
    assert torch.equal(batch.completion_mask, r_full.batch.completion_mask[4:])
    assert torch.equal(advantages, r_full.advantages[4:])
    assert torch.equal(r.lengths, r_full.batch.completion_mask.sum(1))
    stats, _ = masked.train_step()
    assert stats.frac_reward_zero_std == 0.5
    assert stats.completion_length == pytest.approx(r_full.batch.completion_mask.sum(1).float().mean().item())


def test_a_micro_batch_without_signal_trains_nothing(synthetic_data):
    """Every group's rewards equal: one stand-in group with a zero mask runs, and the weights do not move."""
    cfg = build_config(
        {"batch_size": 8, "num_generations": 4, "max_completion_length": 12, "beta": 0.1, "mask_zero_std_groups": True}
    )
    policy = load_policy("tiny", seed=0)

    def same_reward(prompts, completions, **columns):
        return [1.0] * len(completions)

    trainer = GRPOTrainer(
        cfg, policy, load_seed(synthetic_data / "train.jsonl"), CPU, reward_funcs=[same_reward],
        ref_model=copy.deepcopy(policy.model),
    )
    r = trainer.rollout(0, 0)
    batch, advantages = r.trained
    assert r.loss_rows.numel() == 0 and batch.prompt_ids.shape[0] == 4 and not batch.completion_mask.any()
    assert not advantages.any() and r.ref_logp.shape[0] == 4
    start = copy.deepcopy(policy.model)
    stats, _ = trainer.train_step()
    assert stats.frac_reward_zero_std == 1.0 and stats.grad_norm == 0.0
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), policy.model.parameters()))


def test_resume_continues_exactly(tmp_path, train, synthetic_data, stub_judge):
    """A run stopped after step 2 (its step-3 checkpoint and later logs removed) and resumed ends bit-identical."""
    # the stub judge's hashed verdicts give the random model varied rewards, so every step really moves the weights
    folder, last = tmp_path / "runs/r", tmp_path / "runs/r/checkpoints/step-000003"
    args = [*stub_judge.flags, "--warm-start", "false", "--save-steps", "1"]
    args += ["--eval-items", "2", "--max-steps", "3", "--name", "r"]
    train(synthetic_data, *args)
    straight = torch.load(last / "trainer_state.pt", weights_only=False)
    logged = (folder / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(last)
    train(synthetic_data, *args, "--resume")
    resumed = torch.load(last / "trainer_state.pt", weights_only=False)
    assert resumed["step"] == 3
    first = torch.load(folder / "checkpoints/step-000002/trainer_state.pt", weights_only=False)["trainable"]
    assert any(not torch.equal(value, first[name]) for name, value in straight["trainable"].items())  # step 3 moved
    for name, value in straight["trainable"].items():
        assert torch.equal(value, resumed["trainable"][name]), name
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(straight["optimizer"]["state"][0][key], resumed["optimizer"]["state"][0][key])
    relogged = (folder / "metrics.jsonl").read_text().splitlines()
    timing = lambda k: k == "step_time" or k.startswith("time/")  # wall clock: differs between any two runs
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if not timing(k)} for x in lines]
    assert strip(relogged) == strip(logged)  # every step logged once, with the same numbers
