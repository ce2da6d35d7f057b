"""The run folder: --overwrite / --resume checks, atomic checkpoints with a limit, the metrics log and its plot."""

import json

import pytest
import torch

from grpo_fast.config import ConfigError, GRPOConfig, build_config
from grpo_fast.trainer.run_dir import RunLog, latest_checkpoint, load_trainer_state, prepare_run_dir, save_checkpoint


@pytest.fixture
def cfg(tmp_path) -> GRPOConfig:
    return GRPOConfig(output_dir=str(tmp_path / "runs"), name="r", save_total_limit=2)


def _save(cfg: GRPOConfig, step: int) -> None:
    save_checkpoint(cfg.run_dir, step, {"step": step}, lambda folder: folder.mkdir(), cfg)


def test_a_run_folder_is_created_replaced_only_with_overwrite_and_resumed_only_from_a_checkpoint(cfg):
    prepare_run_dir(cfg)
    assert cfg.run_dir.is_dir()
    (cfg.run_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="holds another run: pass --overwrite"):
        prepare_run_dir(cfg)
    cfg.overwrite = True
    prepare_run_dir(cfg)
    assert list(cfg.run_dir.iterdir()) == []  # the old run is gone
    cfg.overwrite, cfg.resume = False, True
    with pytest.raises(ConfigError, match="has no checkpoint to continue from"):
        prepare_run_dir(cfg)
    _save(cfg, 1)
    prepare_run_dir(cfg)  # resuming leaves the folder as it is
    assert latest_checkpoint(cfg.run_dir).name == "step-000001"


def test_checkpoints_keep_the_newest_and_an_unfinished_one_is_never_picked(cfg):
    for step in (1, 2, 3):
        _save(cfg, step)
    folders = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    assert folders == ["step-000002", "step-000003"]  # save_total_limit 2
    saved = cfg.run_dir / "checkpoints/step-000003"
    assert (saved / "model").is_dir() and load_trainer_state(saved) == {"step": 3}
    assert build_config({}, saved / "config.yaml").name == "r"
    # a crash mid-write leaves a hidden temporary folder, or a folder without trainer_state.pt: both are skipped
    (cfg.run_dir / "checkpoints/.tmp-step-000004").mkdir()
    (cfg.run_dir / "checkpoints/step-000005").mkdir()
    assert latest_checkpoint(cfg.run_dir) == saved
    torch.save({"step": 9}, cfg.run_dir / "checkpoints/step-000005/trainer_state.pt")
    assert latest_checkpoint(cfg.run_dir).name == "step-000005"


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


def test_a_disabled_log_writes_nothing(cfg):
    prepare_run_dir(cfg)
    log = RunLog(cfg, enabled=False)  # ranks other than 0
    log.log({"step": 1, "reward": 1.0, "completion_length": 1.0})
    log.samples([{"step": 1}])
    log.plot()
    assert list(cfg.run_dir.iterdir()) == [] and log.records == []
