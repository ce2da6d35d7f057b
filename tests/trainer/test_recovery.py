"""Crash recovery: a training process SIGKILLed mid-step, inside a checkpoint write and during an evaluation (twice
in a row), then `--resume`d each time, ends bit-identical to a run that was never interrupted."""

import json
import signal

import torch

from grpo_fast.train import main
from grpo_fast.trainer.faults import KILL_AT

# 5 steps, a checkpoint after each (the newest 2 kept), evaluations at steps 0, 2, 4 and 5, the rule judge
STEPS = ("--max-steps", "5", "--save-steps", "1", "--eval-steps", "2", "--eval-items", "2")


def _state(run, step):
    return torch.load(run / f"checkpoints/step-{step:06d}/trainer_state.pt", weights_only=False)


def _logged(run):
    """metrics.jsonl without the wall-clock fields (step_time, time/*)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    clock = lambda key: key == "step_time" or key.startswith("time/")
    return [{k: v for k, v in json.loads(line).items() if not clock(k)} for line in lines]


def test_sigkill_at_three_points_then_resume_is_bit_exact(
    tmp_path, synthetic_data, tiny_model_dir, tiny_run_flags, train_process
):
    flags = (*tiny_run_flags, *STEPS, "--model", str(tiny_model_dir), "--data", str(synthetic_data))
    flags += ("--output-dir", str(tmp_path / "runs"))
    main([*flags, "--name", "straight"])  # the uninterrupted run, in this process
    run = tmp_path / "runs/crashed"
    kills = [
        ("step:3", 2),  # mid-step 3: checkpoints 1 and 2 written
        ("checkpoint:2", 3),  # resumed at 2: checkpoint 3 written, killed inside the write of checkpoint 4
        ("eval:1", 3),  # resumed at 3: killed in the step-4 evaluation
    ]
    for i, (point, newest) in enumerate(kills):
        proc = train_process(*flags, "--name", "crashed", *(["--resume"] if i else []), env={KILL_AT: point})
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert checkpoints[-1] == f"step-{newest:06d}", (point, checkpoints)
        assert (".tmp-step-000004" in checkpoints) == (point == "checkpoint:2")  # the torn write (removed at start)
    proc = train_process(*flags, "--name", "crashed", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, resumed = _state(tmp_path / "runs/straight", 5), _state(run, 5)
    first = torch.load(tmp_path / "runs/straight/checkpoints/step-000004/trainer_state.pt", weights_only=False)
    assert any(not torch.equal(v, first["trainable"][k]) for k, v in straight["trainable"].items())  # step 5 moved
    for name, value in straight["trainable"].items():
        assert torch.equal(resumed["trainable"][name], value), name
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(straight["optimizer"]["state"][0][key], resumed["optimizer"]["state"][0][key])
    assert _logged(run) == _logged(tmp_path / "runs/straight")  # every step and evaluation logged once, the same


def test_a_plain_resume_after_an_extension_trains_to_the_new_end(
    tmp_path, synthetic_data, tiny_model_dir, tiny_run_flags, capsys
):
    """--max-steps 1, then --resume --max-steps 3 (stopped after step 2), then the plain --resume: it reads the
    extended config, not the first one, and ends at step 3; resumed once more, its final evaluation is logged."""
    where = ["--output-dir", str(tmp_path / "runs"), "--name", "ext"]
    first = [*tiny_run_flags, "--model", str(tiny_model_dir), "--data", str(synthetic_data), "--save-steps", "1"]
    main([*where, *first, "--eval-items", "1", "--max-steps", "1"])
    main([*where, "--resume", "--max-steps", "3"])
    assert "resume: changed since the run's config.yaml: max_steps: 1 -> 3" in capsys.readouterr().out
    run = tmp_path / "runs/ext"
    (run / "checkpoints/step-000003").rename(run / "gone")  # as if killed after the checkpoint of step 2
    main([*where, "--resume"])
    assert "resuming from" in capsys.readouterr().out and (run / "checkpoints/step-000003").is_dir()
    evals = [r for r in _logged(run) if "eval/reward" in r]
    assert [r["step"] for r in _logged(run) if "reward" in r] == [1, 2, 3] and evals[-1]["step"] == 3
    main([*where, "--resume"])  # nothing left to train: evaluated again, and logged
    assert "nothing left to train" in capsys.readouterr().out
    assert [r["step"] for r in _logged(run) if "eval/reward" in r] == [r["step"] for r in evals] + [3]
