"""What of `make gpu-check` and the CUDA benchmarks a CPU can check: the plan, the trainer flags against the real
CLI, the targets and the report on made-up results, and that every CUDA timing synchronizes before its clock."""

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/memory.py and benchmarks/test_loss.py, imported as the benchmark run imports them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("memory"), importlib.import_module("test_loss")


def test_dry_run_prints_the_plan(tmp_path):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for step in ("environment", "install", "tests", "loss-benchmark", "train-sdpa", "train-flash-attention-2",
                 "torchrun-nccl"):
        assert step in done.stdout
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


@pytest.mark.parametrize("name, attn, torchrun", [("sdpa", "sdpa", False), ("fa2", "flash_attention_2", False),
                                                  ("torchrun", "sdpa", True)])
def test_trainer_flags_are_the_real_clis(gpu_check, tmp_path, name, attn, torchrun):
    from grpo_fast.train import _parser

    cmd = gpu_check.train_command(tmp_path, name, attn, torchrun)
    flags = cmd[cmd.index("grpo_fast.train") + 1:]
    args = _parser().parse_args(flags)  # exits 2 on a flag the CLI does not know
    assert (args.bf16, args.attn_implementation, args.warm_start) == (True, attn, False)
    assert args.max_steps == (3 if torchrun else 10)
    if torchrun:
        assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=1"]


def _rows(ours_s, ours_peak, liger_s, liger_peak, full_peak):
    common = {"shape": "n8k-d4096", "dtype": "bf16", "status": "ok"}
    return [{**common, "impl": "grpo_fast", "seconds": ours_s, "peak_bytes": ours_peak},
            {**common, "impl": "liger", "seconds": liger_s, "peak_bytes": liger_peak},
            {**common, "impl": "full-logits", "seconds": 9.0, "peak_bytes": full_peak},
            {**common, "dtype": "fp32", "impl": "liger", "seconds": 0.001, "peak_bytes": 1}]  # another shape: unused


def test_targets_and_report_on_made_up_results(gpu_check, tmp_path):
    bench = gpu_check.StepResult("loss-benchmark", "pass", data={"rows": _rows(0.9, 400, 1.0, 1000, 3000)})
    goals = gpu_check.targets(bench)
    assert [g["status"] for g in goals] == ["PASS", "PASS", "PASS"]
    # slower than Liger; 600 B > half of Liger's 1000; 600 * 3 = 1800 > 1500
    bad = gpu_check.targets(gpu_check.StepResult("loss-benchmark", "pass", data={"rows": _rows(1.1, 600, 1.0, 1000,
                                                                                               1500)}))
    assert [g["status"] for g in bad] == ["FAIL", "FAIL", "FAIL"]
    assert {g["status"] for g in gpu_check.targets(None)} == {"NOT MEASURED"}

    steps = [gpu_check.StepResult("environment", "pass", 1.0, "H200", {"gpu": "H200"}), bench,
             gpu_check.StepResult("train-flash-attention-2", "skip", 0.0, "flash-attn is not installed")]
    json_path, md_path = gpu_check.write_report(tmp_path / "report", steps, goals)
    report = json.loads(json_path.read_text())
    assert report["passed"] and [s["name"] for s in report["steps"]] == [s.name for s in steps]
    md = md_path.read_text()
    assert "| fwd+bwd time <= Liger's | PASS | 900.0 ms | 1000.0 ms |" in md
    assert "| n8k-d4096 | bf16 | grpo_fast | 900.0 |" in md and "- gpu: H200" in md
    steps[1].status = "fail"
    assert not json.loads(gpu_check.write_report(tmp_path / "report", steps, goals)[0].read_text())["passed"]


def test_cuda_timings_synchronize_before_each_clock(bench, monkeypatch):
    memory, test_loss = bench
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 350)
    cuda = torch.device("cuda")
    memory.median_seconds(lambda: events.append("call"), cuda, rounds=2)
    assert events == ["sync", "call", "sync"] * 2
    events.clear()
    assert memory.peak_extra_bytes(lambda: events.append("call"), cuda) == 250
    assert events == ["sync", "reset", "call", "sync"]
    # a benchmark step ends by waiting for its device, so pytest-benchmark's clock sees the work, not the launch
    waited = []
    monkeypatch.setattr(test_loss, "synchronize", waited.append)
    x = test_loss.make_inputs(2, 3, 8, 50, device=torch.device("cpu"))
    test_loss.make_step("grpo_fast", x)()
    assert waited == [torch.device("cpu")]
