"""Data parallelism and FSDP2: 2 processes with gloo on CPU make the same update as 1 process on the same global
batch."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from grpo_fast.data.synthetic import write_dataset
from grpo_fast.models import load_policy


def _train(tmp_path, name, per_rank_batch, nproc, flags, *extra):
    """A run of 2 steps with `flags` (the tiny run's and the stub judge's) on `per_rank_batch` completions per rank."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "grpo_fast.train", *flags, *extra]
    cmd += ["--warm-start", "false", "--max-steps", "2", "--scale-rewards", "batch"]
    cmd += ["--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs"), "--name", name]
    cmd += ["--batch-size", str(per_rank_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # own process group: a hang is killed with every rank, not just the launcher
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    return torch.load(tmp_path / f"runs/{name}/checkpoints/step-000002/trainer_state.pt", weights_only=False)


def _steps(tmp_path, name):
    lines = (tmp_path / f"runs/{name}/metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "reward" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_run_flags, stub_judge):
    """The data, the run flags and the single-process run (global batch 16) every multi-process run must equal."""
    tmp_path = tmp_path_factory.mktemp("dist")
    write_dataset(tmp_path / "data", 28, seed=0)  # 3 val items: one rank's eval shard is shorter
    flags = (*tiny_run_flags, *stub_judge.flags)
    return tmp_path, flags, _train(tmp_path, "one", 16, 1, flags)


def _assert_same_run(tmp_path, one, two, name):
    # atol 1% of the learning rate: Adam divides by sqrt(v), so an element whose gradient is ~0 turns fp32 summation
    # noise (different batch shapes, the all-reduce) into a visible step; measured: 3 of ~1e5 elements, 2.7e-6
    for key, value in one["trainable"].items():
        torch.testing.assert_close(two["trainable"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # metrics reduced over ranks equal the single process's; rank 0 alone wrote them
    for a, b in zip(_steps(tmp_path, "one"), _steps(tmp_path, name), strict=True):
        for key in ("reward", "reward_std", "completion_length", "loss", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert all(r["grad_norm"] > 0 for r in _steps(tmp_path, "one"))


def test_two_gloo_processes_equal_one_process(one_process):
    tmp_path, flags, one = one_process
    _assert_same_run(tmp_path, one, _train(tmp_path, "two", 8, 2, flags), "two")


def test_fsdp2_over_two_processes_equals_one_process(one_process):
    """Parameters, gradients and optimizer state sharded over 2 ranks (FSDP2, summed reduce-scatter); the greedy
    eval and the sampled rollouts run the sharded model's generate in step on both ranks."""
    tmp_path, flags, one = one_process
    sharded = _train(tmp_path, "fsdp", 8, 2, flags, "--fsdp")
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
