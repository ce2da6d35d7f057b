"""Unscorable completions: left out of the logged reward, counted every step, and a run whose judge never scores
stops with one line and a checkpoint to resume from, instead of training on no signal and exiting 0."""

import copy
import json
import math

import pytest
import torch

from grpo_fast.config import build_config
from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.rewards.stub_server import StubServer
from grpo_fast.train import main
from grpo_fast.trainer import GRPOTrainer

CPU = DistEnv(0, 1, torch.device("cpu"))


def half_scored(prompts, completions, **columns):
    """Group 1 (rows 0-3): 1.0, None, 0.0, None; group 2 (rows 4-7): never scored."""
    return [1.0, None, 0.0, None, None, None, None, None]


def test_step_stats_leave_unscorable_rows_out(synthetic_data, tiny_policy):
    cfg = build_config({"batch_size": 8, "num_generations": 4, "max_completion_length": 4, "beta": 0.0})
    trainer = GRPOTrainer(
        cfg, copy.deepcopy(tiny_policy), load_seed(synthetic_data / "train.jsonl"), CPU, reward_funcs=[half_scored]
    )
    stats, _ = trainer.train_step()
    assert stats.frac_unscorable == 0.75  # 6 of 8
    assert stats.reward == 0.5  # mean of 1.0 and 0.0; counting the unscorable rows as 0 would give 0.125
    # group 1: the std of (1, 0) = 0.707; group 2 has no two scored rows: std 0, no signal
    assert stats.reward_std == pytest.approx(math.sqrt(0.5) / 2) and stats.frac_reward_zero_std == 0.5


def test_a_judge_that_never_scores_stops_the_run_with_a_checkpoint(
    tmp_path, synthetic_data, tiny_run_flags, stub_judge, capsys
):
    """Every reply lacks a score and a verdict: 3 steps with all completions unscorable, then exit 2 with one
    `error:` line; the checkpoint of step 3 resumes once the judge is fixed."""
    folders = ["--data", str(synthetic_data), "--output-dir", str(tmp_path / "runs"), "--name", "garbage"]
    flags = [*tiny_run_flags, *folders, "--warm-start", "false", "--max-completion-length", "4", "--eval-items", "2"]
    with StubServer(lambda request: "This answer is hard to grade.") as garbage:
        judge = [*stub_judge.flags, "--judge-base-url", garbage.url, "--judge-backoff-base-s", "0.01"]
        with pytest.raises(SystemExit) as stopped:
            main([*flags, *judge, "--max-steps", "10"])
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: 3 steps in a row")
    assert "unscorable" in errors[0] and "--resume" in errors[0]
    run = tmp_path / "runs/garbage"
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "frac_unscorable" in r]
    assert [(r["step"], r["frac_unscorable"], r["judge/unscorable"]) for r in steps] == [(s, 1.0, 8) for s in (1, 2, 3)]
    assert all(r["reward"] is None or math.isnan(r["reward"]) for r in steps)  # no reward, rather than 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003"]
    # the judge fixed (the session's stub scores every reply): the run continues from step 3
    main([*flags, *stub_judge.flags, "--max-steps", "4", "--resume"])
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "frac_unscorable" in r]
    assert [(r["step"], r["frac_unscorable"]) for r in steps][-1] == (4, 0.0)
