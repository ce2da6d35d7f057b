"""The run folder: config.yaml, metrics.jsonl, samples.jsonl, reward_curve.png and atomic checkpoints.

    runs/<name>/config.yaml          the resolved config
    runs/<name>/metrics.jsonl        one line per logged step ({"step", "reward", "kl", ...}) and per evaluation
    runs/<name>/samples.jsonl        prompt, completion, reward, judgment and advantage of a few rollouts per step
    runs/<name>/reward_curve.png     reward, KL and completion length over steps
    runs/<name>/checkpoints/step-N/  trainer_state.pt (trainable weights, optimizer, scheduler, RNG, step),
                                     model/ (the policy, loadable with grpo_fast.models.load_policy), config.yaml
    runs/<name>/final/               the trained policy

A checkpoint is written to a hidden temporary folder and renamed into place, so a crash mid-write never leaves a
half checkpoint that `--resume` would pick up. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grpo_fast.config import ConfigError, GRPOConfig, save_yaml
from grpo_fast.plotting import Panel, Series, plot_panels

CHECKPOINTS = "checkpoints"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", CHECKPOINTS)


def prepare_run_dir(cfg: GRPOConfig) -> None:
    """Checks the run folder against --overwrite / --resume and creates it; ConfigError when they conflict."""
    run = cfg.run_dir
    holds_run = run.is_dir() and any((run / m).exists() for m in RUN_MARKERS)
    if cfg.resume:
        if latest_checkpoint(run) is None:
            raise ConfigError(f"--resume: {run} has no checkpoint to continue from")
        return
    if holds_run and not cfg.overwrite:
        raise ConfigError(
            f"{run} holds another run: pass --overwrite to replace it, --resume to continue it, or another --name"
        )
    if holds_run:
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    folder = run_dir / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if (p / "trainer_state.pt").is_file()] if folder.is_dir() else []
    return max(found, key=checkpoint_step, default=None)


def save_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], save_model: Callable[[Path], None], cfg: GRPOConfig
) -> Path:
    """Writes checkpoints/step-N atomically (`save_model(folder)` writes the model) and keeps the newest
    `cfg.save_total_limit`."""
    folder = run_dir / CHECKPOINTS
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp / "model")
    save_yaml(cfg, tmp / "config.yaml")
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted((p for p in folder.glob("step-*") if p.is_dir()), key=checkpoint_step)
    for old in done[: -cfg.save_total_limit]:
        shutil.rmtree(old)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", weights_only=False)


class RunLog:
    """metrics.jsonl, samples.jsonl, the plot and an optional TensorBoard / W&B mirror; a no-op off rank 0."""

    def __init__(self, cfg: GRPOConfig, enabled: bool) -> None:
        self.dir, self.enabled = cfg.run_dir, enabled
        self.records: list[dict[str, Any]] = []
        self._tb = self._wandb = None
        if not enabled:
            return
        if cfg.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--report_to tensorboard needs tensorboard: pip install tensorboard") from None
            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        elif cfg.report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report_to wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project="grpo_fast", name=cfg.name, config=cfg.to_dict(), dir=str(self.dir))

    def resume_at(self, step: int) -> None:
        """Drops what was logged after `step` (the checkpoint a resumed run continues from) and reloads the rest."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.dir / name
            if path.is_file():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept))
        self.records = _read_jsonl(self.dir / "metrics.jsonl")

    def log(self, record: dict[str, Any]) -> None:
        """Appends one record (it must hold "step") to metrics.jsonl and the mirrors."""
        if not self.enabled:
            return
        self.records.append(record)
        _append_jsonl(self.dir / "metrics.jsonl", [record])
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def samples(self, records: list[dict[str, Any]]) -> None:
        """Appends completion records (`grpo_fast.trainer.rollout.sample_records`) to samples.jsonl."""
        if self.enabled and records:
            _append_jsonl(self.dir / "samples.jsonl", records)

    def plot(self) -> None:
        """reward_curve.png: mean reward, KL and completion length per step (eval reward as points)."""
        if not self.enabled:
            return
        train = [r for r in self.records if "reward" in r]
        evals = [r for r in self.records if "eval/reward" in r]
        steps = [r["step"] for r in train]
        reward = [Series(steps, [r["reward"] for r in train], "train (sampled)")]
        if evals:
            evals_x, evals_y = [r["step"] for r in evals], [r["eval/reward"] for r in evals]
            reward.append(Series(evals_x, evals_y, "val (greedy)", fmt="o-", lw=1.5))
        panels = [
            Panel("reward", "step", "mean reward", reward),
            Panel("KL", "step", "KL to reference (k3)", [Series(steps, [r.get("kl", math.nan) for r in train])]),
            Panel("completion length", "step", "tokens", [Series(steps, [r["completion_length"] for r in train])]),
        ]
        plot_panels(self.dir / "reward_curve.png", panels, size=(10, 3.2))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
