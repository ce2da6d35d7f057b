"""The run folder: --overwrite / --resume checks, the lock, checkpoints (atomic, checksummed, a limit, a fallback past a
corrupt one, a full disk), and the metrics log (strict JSON, torn lines) with its plot."""

import errno
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from grpo_fast.config import ConfigError, GRPOConfig, build_config
from grpo_fast.train import main
from grpo_fast.trainer import run_dir
from grpo_fast.trainer.run_dir import (
    RunDirError,
    RunLog,
    latest_checkpoint,
    load_trainer_state,
    prepare_run_dir,
    save_checkpoint,
)


@pytest.fixture
def cfg(tmp_path) -> GRPOConfig:
    return GRPOConfig(output_dir=str(tmp_path / "runs"), name="r", save_total_limit=2)


def _save(cfg: GRPOConfig, step: int) -> None:
    save_checkpoint(cfg.run_dir, step, {"step": step}, lambda folder: folder.mkdir(), cfg)


def _names(cfg: GRPOConfig) -> list[str]:
    return sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())


def test_a_run_folder_is_created_replaced_only_with_overwrite_and_resumed_only_from_a_checkpoint(cfg):
    cfg.resume = True
    with pytest.raises(ConfigError, match="r does not exist: check --name and --output-dir"):
        prepare_run_dir(cfg)
    assert not cfg.run_dir.exists()
    cfg.resume = False
    prepare_run_dir(cfg).release()
    assert cfg.run_dir.is_dir()
    (cfg.run_dir / "metrics.jsonl").write_text("{}\n")
    # a run that died before its first checkpoint: --resume cannot help, --overwrite can
    with pytest.raises(ConfigError, match="holds a run that never reached a checkpoint: pass --overwrite"):
        prepare_run_dir(cfg)
    cfg.resume = True
    with pytest.raises(ConfigError, match="never reached a checkpoint: pass --overwrite instead of --resume"):
        prepare_run_dir(cfg)
    _save(cfg, 1)
    cfg.resume = False
    with pytest.raises(ConfigError, match="holds another run: pass --overwrite to replace it, --resume to continue"):
        prepare_run_dir(cfg)
    cfg.overwrite = True
    prepare_run_dir(cfg).release()
    assert [p.name for p in cfg.run_dir.iterdir()] == ["train.lock"]  # the old run is gone
    cfg.overwrite, cfg.resume = False, True
    with pytest.raises(ConfigError, match="holds no run to continue"):
        prepare_run_dir(cfg)
    _save(cfg, 1)
    prepare_run_dir(cfg).release()  # resuming leaves the folder as it is
    assert latest_checkpoint(cfg.run_dir).name == "step-000001"


def test_checkpoints_keep_the_newest_and_an_unfinished_one_is_never_picked(cfg):
    for step in (1, 2, 3):
        _save(cfg, step)
    assert _names(cfg) == ["step-000002", "step-000003"]  # save_total_limit 2
    saved = cfg.run_dir / "checkpoints/step-000003"
    assert (saved / "model").is_dir() and load_trainer_state(saved) == {"step": 3}
    assert build_config({}, saved / "config.yaml").name == "r"
    manifest = json.loads((saved / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["config.yaml", "trainer_state.pt"]
    assert manifest["trainer_state.pt"]["bytes"] == (saved / "trainer_state.pt").stat().st_size
    # a kill mid-write leaves a hidden temporary folder, or (an older layout) a folder without its manifest
    (cfg.run_dir / "checkpoints/.tmp-step-000004").mkdir()
    (cfg.run_dir / "checkpoints/step-000005").mkdir()
    torch.save({"step": 5}, cfg.run_dir / "checkpoints/step-000005/trainer_state.pt")
    assert latest_checkpoint(cfg.run_dir) == saved


def test_resume_falls_back_past_corrupt_checkpoints_and_prunes_at_start_up(cfg):
    cfg.save_total_limit = 3
    for step in (1, 2, 3):
        _save(cfg, step)
    (cfg.run_dir / "checkpoints/.tmp-step-000004").mkdir()  # a torn write
    state = cfg.run_dir / "checkpoints/step-000003/trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-7])  # truncated
    cfg.resume, cfg.save_total_limit = True, 1
    with pytest.warns(UserWarning, match=r"step-000003 is not intact \(trainer_state.pt has \d+ bytes where \d+ w"):
        prepare_run_dir(cfg).release()
    # the bad one moved aside; the torn write and the checkpoints beyond the (lowered) limit removed
    assert _names(cfg) == ["corrupt-step-000003", "step-000002"]
    assert latest_checkpoint(cfg.run_dir).name == "step-000002"
    config = cfg.run_dir / "checkpoints/step-000002/config.yaml"
    config.write_text(config.read_text().replace("name: r", "name: s"))  # same size, other bytes
    with pytest.raises(RunDirError, match=r"no intact checkpoint in .*step-000002: config.yaml does not match its ch"):
        prepare_run_dir(cfg)
    with pytest.raises(RunDirError, match=r"\): pass --overwrite instead of --resume to start the run again$"):
        prepare_run_dir(cfg)  # the same: nothing was moved


def test_a_full_disk_mid_checkpoint_removes_the_partial_write_and_keeps_the_previous_one(cfg, monkeypatch):
    _save(cfg, 1)

    def no_space(obj, path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_dir.torch, "save", no_space)
    with pytest.raises(RunDirError) as info:
        _save(cfg, 2)
    assert str(info.value) == (
        f"cannot write checkpoint {cfg.run_dir}/checkpoints/step-000002 (no space left on device): the partial write "
        "was removed and step-000001 kept; free space on that disk, then --resume"
    )
    assert _names(cfg) == ["step-000001"] and latest_checkpoint(cfg.run_dir).name == "step-000001"

    # torch.save reports a full disk as a RuntimeError ("unexpected pos"): told apart by the free space left
    def unexpected_pos(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(run_dir.torch, "save", unexpected_pos)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # space left: not a full disk, raised as it is
        _save(cfg, 2)
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(RunDirError, match="no space left on device"):
        _save(cfg, 2)
    assert _names(cfg) == ["step-000001"]


def test_a_full_disk_stops_training_with_one_line_and_exit_code_2(
    tmp_path, synthetic_data, tiny_run_flags, monkeypatch, capsys
):
    saves = []

    def second_fails(obj, path):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.serialization.save(obj, path)

    monkeypatch.setattr(run_dir.torch, "save", second_fails)
    args = ["--output-dir", str(tmp_path / "runs"), "--data", str(synthetic_data), *tiny_run_flags, "--eval-items", "1"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--warm-start", "false", "--max-steps", "3", "--save-steps", "1", "--name", "full"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("error: cannot write checkpoint ") and "step-000002" in err[-1]
    assert sorted(p.name for p in (tmp_path / "runs/full/checkpoints").iterdir()) == ["step-000001"]


HOLD = """
import fcntl, json, os, signal, sys
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0)
f.write(json.dumps({"pid": os.getpid(), "host": "elsewhere", "started": "2025-01-02T03:04:05"}))
f.flush()
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_process_is_told_who_holds_the_run_folder_and_a_dead_holder_is_taken_over(cfg, capsys):
    prepare_run_dir(cfg).release()
    lock_file = cfg.run_dir / "train.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_file), "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunDirError) as info:
            prepare_run_dir(cfg)
        assert str(info.value) == (
            f"{cfg.run_dir} is in use by pid {holder.pid} on elsewhere, since 2025-01-02T03:04:05: let it finish "
            "(or stop it), or pass another --name"
        )
        with pytest.raises(SystemExit) as exit_info:  # the command line: one line, exit code 2
            main(["--output-dir", cfg.output_dir, "--name", "r", "--overwrite"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err == f"error: {info.value}\n"
    finally:
        holder.communicate("")
    # a holder killed with the lock: the kernel has dropped the flock, its name is still in the file
    dead = subprocess.run([sys.executable, "-c", HOLD, str(lock_file), "die"], check=False)
    assert dead.returncode == -9
    with pytest.warns(
        UserWarning, match=r"taking over the lock of pid \d+ on elsewhere, since 2025-01-02T03:04:05, wh"
    ):
        lock = prepare_run_dir(cfg)
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert lock_file.read_text() == ""  # a clean end names no holder


def test_an_output_folder_that_cannot_be_created_is_one_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as info:
        main(["--output-dir", str(tmp_path / "a-file/runs"), "--name", "x"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err == (
        f"error: cannot create the run folder {tmp_path}/a-file/runs/x (Not a directory): pass an --output-dir you "
        "can write to\n"
    )


def test_resume_at_drops_what_was_logged_after_the_checkpoint_and_the_plot_is_written(cfg):
    prepare_run_dir(cfg)
    log = RunLog(cfg, enabled=True)
    log.log({"step": 0, "eval/reward": 0.1})
    for step in (1, 2, 3):
        log.log({"step": step, "reward": 0.1 * step, "kl": 0.01, "completion_length": 5.0})
        log.samples([{"step": step, "completion": "x"}])
    log.log({"step": 3, "eval/reward": 0.4})
    again = RunLog(cfg, enabled=True)
    again.resume_at(2)
    assert [r["step"] for r in again.records] == [0, 1, 2]
    samples = [json.loads(line) for line in (cfg.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2]
    again.plot()
    assert (cfg.run_dir / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_metrics_are_strict_json_with_null_for_nan_and_a_torn_last_line_is_dropped(cfg):
    prepare_run_dir(cfg)
    log = RunLog(cfg, enabled=True)
    log.log({"step": 1, "reward": math.nan, "kl": math.inf, "completion_length": 5.0})
    log.samples([{"step": 1, "rewards": [math.nan, 0.5]}])
    metrics, samples = cfg.run_dir / "metrics.jsonl", cfg.run_dir / "samples.jsonl"
    assert _strict_json(metrics.read_text()) == {"step": 1, "reward": None, "kl": None, "completion_length": 5.0}
    assert _strict_json(samples.read_text())["rewards"] == [None, 0.5]
    # a kill mid-write leaves half a line at the end of either file
    with open(metrics, "a") as f:
        f.write('{"step": 2, "reward": 0.')
    with open(samples, "a") as f:
        f.write('{"step": 2, "comp')
    again = RunLog(cfg, enabled=True)
    with pytest.warns(UserWarning) as caught:
        again.resume_at(2)
    assert sorted(str(w.message).split(":")[0] for w in caught) == [str(metrics), str(samples)]
    assert all("dropped its torn last line" in str(w.message) for w in caught)
    assert [r["step"] for r in again.records] == [1] and math.isnan(again.records[0]["reward"])  # null: NaN again
    assert metrics.read_text().endswith("}\n") and samples.read_text().count("\n") == 1
    # a bad line that is not the last is no torn write: one line naming it
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2 is not a JSON line: delete that line, then --resume"):
        RunLog(cfg, enabled=True).resume_at(2)


def test_a_disabled_log_writes_nothing(cfg):
    prepare_run_dir(cfg)
    log = RunLog(cfg, enabled=False)  # ranks other than 0
    log.log({"step": 1, "reward": 1.0, "completion_length": 1.0})
    log.samples([{"step": 1}])
    log.plot()
    assert [p.name for p in cfg.run_dir.iterdir()] == ["train.lock"] and log.records == []
