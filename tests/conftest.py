"""Test set-up shared by every test module.

Without a GPU, the Triton kernels are checked under the Triton interpreter, which must be switched on before
triton decorates the kernels, i.e. before `grpo_fast.kernels` is imported.

Fixtures: `synthetic_data` (a small generated data folder) and `few_items` (4 of its items), `tiny_policy` (the
built-in model, to read only) and `tiny_model_dir` (it, saved as a folder), `tiny_run_flags` (flags that make a training run take seconds per step),
`train_process` (`python -m grpo_fast.train` as a subprocess, alone or under torchrun) and `stub_judge` (the
OpenAI-compatible stub server and the flags that point `--judge llm` at it).
"""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under `make asan`, GRPO_FAST_TILING_SO names the sanitizer build of the extension (the tiler and the CPU row ops):
# it is loaded as `grpo_fast._tiling` before any test module imports it, so that the suite's own build stays in place
# for everyone else.
if _sanitized := os.environ.get("GRPO_FAST_TILING_SO"):
    import importlib.util

    import grpo_fast

    if "grpo_fast._tiling" in sys.modules:
        raise RuntimeError("grpo_fast._tiling was imported before tests/conftest.py could load GRPO_FAST_TILING_SO")
    _spec = importlib.util.spec_from_file_location("grpo_fast._tiling", _sanitized)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    sys.modules["grpo_fast._tiling"] = grpo_fast._tiling = _module

# imported after the switch, so that nothing they might pull in decorates kernels before it
from grpo_fast.data.seed import load_seed
from grpo_fast.data.synthetic import write_dataset
from grpo_fast.rewards.stub_server import StubServer, hash_reply


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A synthetic data folder of 40 items (36 train, 4 val), seed 0; treat it as read-only."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_dataset(folder, 40, seed=0)
    return folder


@pytest.fixture(scope="session")
def few_items(synthetic_data) -> list[dict]:
    """The first 4 train items of `synthetic_data` (their images have different tile counts)."""
    return load_seed(synthetic_data / "train.jsonl")[:4]


@pytest.fixture(scope="session")
def tiny_policy():
    """The tiny built-in policy (seed 0), shared by the tests that only read it: do not train or modify it."""
    from grpo_fast.models import load_policy  # transformers and the tiler: only for the tests that need a model

    return load_policy("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_policy, tmp_path_factory):
    """`tiny_policy` saved as a model folder: `--model` it to skip the preset's tokenizer training and warm start."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_policy.save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_run_flags() -> tuple[str, ...]:
    """`grpo_fast.train` flags for seconds per step: 2 prompts x G=4, completions of at most 8 tokens, 4 eval items,
    one torch thread (not "auto", which follows the machine's load: runs compared bit for bit need one count)."""
    return (
        "--torch-threads",
        "1",
        "--batch-size",
        "8",
        "--num-generations",
        "4",
        "--max-completion-length",
        "8",
        "--eval-items",
        "4",
        "--learning-rate",
        "1e-3",
    )


@pytest.fixture(scope="session")
def train_process():
    """Runs `python -m grpo_fast.train *args` (under torchrun when nproc > 1) with `env` added to the environment, in
    a session of its own (a hang past `timeout` kills every rank, then fails the test); returns the
    CompletedProcess (stdout and stderr as text)."""

    def run(*args: str, nproc: int = 1, env: dict[str, str] | None = None, timeout: float = 300):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "grpo_fast.train", *args]
        environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"{' '.join(cmd)} still ran after {timeout} s")
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return run


@dataclass(frozen=True)
class StubJudge:
    server: StubServer
    flags: tuple[str, ...]  # --judge llm against the server (model "stub", key variable STUB_KEY)


@pytest.fixture(scope="session")
def stub_judge():
    """The stub judge for the session: its hashed verdicts give even a random model's completions varied rewards,
    hence a real gradient. STUB_KEY is set (to any value) for this process and the ones it starts."""
    with pytest.MonkeyPatch.context() as patch, StubServer(hash_reply, lifetime_s=3600.0) as server:
        patch.setenv("STUB_KEY", "unused")
        flags = ("--judge", "llm", "--judge-model", "stub", "--judge-base-url", server.url)
        yield StubJudge(server, (*flags, "--judge-api-key-env", "STUB_KEY"))
