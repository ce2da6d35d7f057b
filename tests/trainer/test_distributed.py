"""Data parallelism and FSDP2: 2 processes with gloo on CPU make the same update as 1 process on the same global
batch; a rank killed mid-run stops the other, and `--resume` continues exactly."""

import json
import re

import pytest
import torch

from grpo_fast.data.synthetic import write_dataset
from grpo_fast.models import load_policy
from grpo_fast.trainer.faults import KILL_AT


def _args(tmp_path, name, per_rank_batch, flags, *extra):
    """A run of 2 steps with `flags` (the tiny run's, the stub judge's, the tiny model's folder) on `per_rank_batch`
    completions per rank."""
    args = [*flags, *extra, "--max-steps", "2", "--scale-rewards", "batch"]
    args += ["--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs"), "--name", name]
    return [*args, "--batch-size", str(per_rank_batch)]


def _state(tmp_path, name, step=2):
    return torch.load(tmp_path / f"runs/{name}/checkpoints/step-{step:06d}/trainer_state.pt", weights_only=False)


def _train(train_process, tmp_path, name, per_rank_batch, nproc, flags, *extra):
    proc = train_process(*_args(tmp_path, name, per_rank_batch, flags, *extra), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _state(tmp_path, name)


def _steps(tmp_path, name):
    lines = (tmp_path / f"runs/{name}/metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "reward" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, tiny_run_flags, stub_judge, train_process):
    """The data, the run flags and the single-process run (global batch 16) every multi-process run must equal."""
    tmp_path = tmp_path_factory.mktemp("dist")
    write_dataset(tmp_path / "data", 28, seed=0)  # 3 val items: one rank's eval shard is shorter
    flags = (*tiny_run_flags, *stub_judge.flags, "--model", str(tiny_model_dir))
    return tmp_path, flags, _train(train_process, tmp_path, "one", 16, 1, flags)


@pytest.fixture(scope="module")
def two_processes(one_process, train_process):
    """The uninterrupted data-parallel run: 2 gloo processes of 8 completions each."""
    tmp_path, flags, _ = one_process
    return _train(train_process, tmp_path, "two", 8, 2, flags)


def _assert_same_run(tmp_path, one, two, name):
    # atol 1% of the learning rate: Adam divides by sqrt(v), so an element whose gradient is ~0 turns fp32 summation
    # noise (different batch shapes, the all-reduce) into a visible step; measured: 3 of ~1e5 elements, 2.7e-6
    for key, value in one["trainable"].items():
        torch.testing.assert_close(two["trainable"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # metrics reduced over ranks equal the single process's; rank 0 alone wrote them
    for a, b in zip(_steps(tmp_path, "one"), _steps(tmp_path, name), strict=True):
        # judge/completions: each rank's judge counters, summed over the ranks
        for key in ("reward", "reward_std", "completion_length", "loss", "entropy", "grad_norm", "judge/completions"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert all(r["grad_norm"] > 0 for r in _steps(tmp_path, "one"))


def test_two_gloo_processes_equal_one_process(one_process, two_processes):
    tmp_path, _, one = one_process
    _assert_same_run(tmp_path, one, two_processes, "two")


def test_a_rank_killed_mid_step_stops_the_other_and_resume_continues_exactly(one_process, two_processes, train_process):
    """Rank 1 SIGKILLed in step 2 (checkpoint 1 written): the launch ends (no hang) with rank 0's one-line error and
    torchrun's report naming rank 1; `--resume` on 2 processes then ends bit-identical to the uninterrupted run."""
    tmp_path, flags, _ = one_process
    args = _args(tmp_path, "killed", 8, flags, "--save-steps", "1", "--dist-timeout-s", "60")
    killed = train_process(*args, nproc=2, env={KILL_AT: "step:2:1"}, timeout=240)
    assert killed.returncode != 0 and not (tmp_path / "runs/killed/checkpoints/step-000002").exists()
    assert re.search(r"^error: rank 0 of 2[: ]", killed.stderr, re.MULTILINE), killed.stderr[-3000:]
    assert re.search(r"rank\s*: 1 .*\n.*exitcode\s*: -9", killed.stderr), killed.stderr[-3000:]  # torchrun's report
    resumed = train_process(*args, "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 1)" in resumed.stdout
    state = _state(tmp_path, "killed")
    for name, value in two_processes["trainable"].items():
        assert torch.equal(state["trainable"][name], value), name
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state["optimizer"]["state"][0][key], two_processes["optimizer"]["state"][0][key])


def test_fsdp2_over_two_processes_equals_one_process(one_process, train_process):
    """Parameters, gradients and optimizer state sharded over 2 ranks (FSDP2, summed reduce-scatter); the greedy
    eval and the sampled rollouts run the sharded model's generate in step on both ranks."""
    tmp_path, flags, one = one_process
    sharded = _train(train_process, tmp_path, "fsdp", 8, 2, flags, "--fsdp")
    _assert_same_run(tmp_path, one, sharded, "fsdp")
    # checkpoints hold the gathered weights and optimizer state; the final policy loads without FSDP
    assert set(sharded["optimizer"]["state"]) >= set(one["trainable"])
    final = load_policy(tmp_path / "runs/fsdp/final").model.state_dict()
    for key, value in one["trainable"].items():
        assert final[key].shape == value.shape, key
    # the shorter eval shard was padded for the lockstep generate, and the padding left out of the metrics
    evals = {
        name: [
            r
            for r in map(json.loads, (tmp_path / f"runs/{name}/metrics.jsonl").read_text().splitlines())
            if "eval/items" in r
        ]
        for name in ("one", "fsdp")
    }
    assert evals["fsdp"] == evals["one"] and evals["one"][0]["eval/items"] == 3
