"""The torch thread count: a setting, or "auto" from the cores other processes leave idle; a run keeps its count."""

import subprocess
import sys

import pytest
import torch
import yaml

from grpo_fast.threads import busy_cores, resolve_threads, usable_cores
from grpo_fast.train import main, parse_args


def test_a_positive_count_is_kept_and_a_negative_one_refused():
    assert resolve_threads(3, busy=99.0) == 3
    with pytest.raises(ValueError, match="threads must be >= 0"):
        resolve_threads(-1)


def test_auto_takes_the_idle_cores_and_never_fewer_than_one(monkeypatch):
    monkeypatch.setattr("grpo_fast.threads.usable_cores", lambda: 4)
    assert [resolve_threads(0, busy=b) for b in (0.0, 0.4, 1.0, 2.6, 3.9, 8.0)] == [4, 4, 3, 1, 1, 1]


def test_busy_cores_sees_a_spinning_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.5 <= busy <= usable_cores() + 0.5, busy


def test_a_run_records_the_resolved_count_and_its_resume_keeps_it(
    tmp_path, synthetic_data, tiny_model_dir, tiny_run_flags
):
    threads = torch.get_num_threads()
    where = ["--output-dir", str(tmp_path / "runs"), "--name", "t"]
    flags = [*tiny_run_flags, "--model", str(tiny_model_dir), "--data", str(synthetic_data), "--eval-items", "1"]
    try:
        main([*where, *flags, "--max-steps", "1", "--torch-threads", "0"])  # the later flag wins: auto
        saved = yaml.safe_load((tmp_path / "runs/t/config.yaml").read_text())["torch_threads"]
        assert 1 <= saved <= usable_cores() and torch.get_num_threads() == saved
        # the resumed run's config reads the recorded count, whatever the machine's load is now
        (tmp_path / "runs/t/config.yaml").write_text(
            (tmp_path / "runs/t/config.yaml").read_text().replace(f"torch_threads: {saved}", "torch_threads: 7")
        )
        assert parse_args([*where, "--resume"]).torch_threads == 7
        assert parse_args([*where, "--max-steps", "1"]).torch_threads == 0  # a fresh run is auto again
    finally:
        torch.set_num_threads(threads)
