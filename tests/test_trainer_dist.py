"""Data parallelism: 2 processes with gloo on CPU make the same update as 1 process on the same global batch."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from grpo_fast.data.synthetic import generate
from grpo_fast.rewards.stub_server import StubServer, hash_reply

# The stub judge's hashed verdicts give a random model's completions varied rewards, hence a real gradient.
ARGS = [
    "--warm-start",
    "false",
    "--max-steps",
    "2",
    "--num-generations",
    "4",
    "--max-completion-length",
    "8",
    "--eval-items",
    "4",
    "--learning-rate",
    "1e-3",
    "--scale-rewards",
    "batch",
    "--judge",
    "llm",
    "--judge-model",
    "stub",
    "--judge-api-key-env",
    "STUB_KEY",
]


def _train(tmp_path, name, per_rank_batch, nproc, judge_url):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "grpo_fast.train", *ARGS]
    cmd += ["--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs"), "--name", name]
    cmd += ["--batch-size", str(per_rank_batch), "--judge-base-url", judge_url]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STUB_KEY": "unused"}
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


def test_two_gloo_processes_equal_one_process(tmp_path):
    generate(tmp_path / "data", n=24, seed=0)
    with StubServer(hash_reply) as server:
        one = _train(tmp_path, "one", per_rank_batch=16, nproc=1, judge_url=server.url)
        two = _train(tmp_path, "two", per_rank_batch=8, nproc=2, judge_url=server.url)
    # atol 1% of the learning rate: Adam divides by sqrt(v), so an element whose gradient is ~0 turns fp32 summation
    # noise (different batch shapes, the all-reduce) into a visible step; measured: 3 of ~1e5 elements, 2.7e-6
    for name, value in one["trainable"].items():
        torch.testing.assert_close(two["trainable"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # metrics reduced over ranks equal the single process's; rank 0 alone wrote them
    for a, b in zip(_steps(tmp_path, "one"), _steps(tmp_path, "two"), strict=True):
        for key in ("reward", "reward_std", "completion_length", "loss", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert all(r["grad_norm"] > 0 for r in _steps(tmp_path, "one"))
