"""The run folder: config.yaml, metrics.jsonl, samples.jsonl, reward_curve.png, atomic checkpoints and a lock.

    runs/<name>/config.yaml          the resolved config (rewritten by each --resume, the new flags on top)
    runs/<name>/metrics.jsonl        one line per logged step ({"step", "reward", "kl", ...}) and per evaluation;
                                     strict JSON: a NaN is written null
    runs/<name>/samples.jsonl        prompt, completion, reward, judgment and advantage of a few rollouts per step
    runs/<name>/reward_curve.png     reward, KL and completion length over steps
    runs/<name>/train.lock           held (fcntl.flock) by the process training in the folder, which it names
    runs/<name>/checkpoints/step-N/  trainer_state.pt (trainable weights, optimizer, scheduler, RNG, step),
                                     model/ (the policy, loadable with grpo_fast.models.load_policy), config.yaml,
                                     and manifest.json (size and SHA-256 of every other file), written last
    runs/<name>/final/               the trained policy

A checkpoint is written to a hidden temporary folder, every file fsynced, the manifest last, and renamed into
place, so a kill mid-write never leaves a half checkpoint that `--resume` would pick up; one whose files no longer
match its manifest (a truncated or damaged file) is moved aside to corrupt-step-N on resume, with a warning, and
the newest intact one is used. A failed write (a full disk) removes its temporary folder and keeps the previous
checkpoints. Only rank 0 writes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from grpo_fast.config import ConfigError, GRPOConfig, save_yaml
from grpo_fast.plotting import Panel, Series, plot_panels
from grpo_fast.trainer.faults import crash_point

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LOCK = "train.lock"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", CHECKPOINTS)
# Free bytes under which a failed write is put down to a full disk: torch.save reports one as "unexpected pos".
DISK_FULL_BYTES = 64 * 2**20


class RunDirError(RuntimeError):
    """The run folder cannot be used or written (in use, not creatable, disk full, no intact checkpoint); the
    message is one line that says what to do."""


class RunLock:
    """An exclusive lock on a run folder for as long as a process trains in it: `fcntl.flock` on train.lock, which
    holds the holder's pid, host and start time. The kernel drops a flock when its process dies, however it dies,
    so a lock file still naming a holder that is gone is taken over, with a warning. `release` (or the process's
    end) frees it."""

    def __init__(self, run: Path) -> None:
        self.path = run / LOCK
        try:
            self._file = open(self.path, "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
        except OSError as e:
            raise RunDirError(f"cannot write in {run} ({e.strerror}): pass an --output-dir you can write to") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self._file.close()
            raise RunDirError(
                f"{run} is in use by {holder or 'another process'}: let it finish (or stop it), or pass another --name"
            ) from None
        left = self._holder()
        if left:
            warnings.warn(
                f"{self.path}: taking over the lock of {left}, which ended without releasing it", stacklevel=2
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(me) + "\n")
        self._file.flush()

    def _holder(self) -> str:
        """Who the lock file names ("pid 12 on host, since 2025-01-01T12:00:00"), or "" when it names no one."""
        self._file.seek(0)
        try:
            held = json.loads(self._file.read() or "null")
            return f"pid {held['pid']} on {held['host']}, since {held['started']}" if held else ""
        except (ValueError, KeyError, TypeError):
            return "an unknown process"

    def release(self) -> None:
        """Clears the lock file (a clean end leaves no holder named) and unlocks it; safe to call twice."""
        if getattr(self, "_file", None) is None or self._file.closed:  # (from __del__ after a failed __init__)
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()

    __del__ = release


def prepare_run_dir(cfg: GRPOConfig) -> RunLock:
    """Creates and locks the run folder and checks it against --overwrite / --resume (ConfigError when they
    conflict, RunDirError when it cannot be used). On --resume it also settles the checkpoints: corrupt ones moved
    aside (`resume_checkpoint`), leftovers of a torn write and those beyond save_total_limit removed. Returns the
    lock: the caller holds it while training."""
    run = cfg.run_dir
    if cfg.resume and not run.is_dir():
        raise ConfigError(f"--resume: {run} does not exist: check --name and --output-dir")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"cannot create the run folder {run} ({e.strerror}): pass an --output-dir you can write to"
        ) from None
    lock = RunLock(run)
    holds_run = any((run / m).exists() for m in RUN_MARKERS)
    reached_checkpoint = (run / CHECKPOINTS).is_dir() and any((run / CHECKPOINTS).glob("step-*"))
    if cfg.resume:
        if not holds_run:
            raise ConfigError(f"--resume: {run} holds no run to continue: check --name and --output-dir")
        if not reached_checkpoint:
            raise ConfigError(
                f"--resume: {run} never reached a checkpoint: pass --overwrite instead of --resume to start it again"
            )
        resume_checkpoint(run)
        prune_checkpoints(run, cfg.save_total_limit)
        return lock
    if holds_run and not cfg.overwrite:
        if not reached_checkpoint:
            raise ConfigError(
                f"{run} holds a run that never reached a checkpoint: pass --overwrite to start it again, "
                "or another --name"
            )
        raise ConfigError(
            f"{run} holds another run: pass --overwrite to replace it, --resume to continue it, or another --name"
        )
    if holds_run:  # --overwrite: everything goes but the lock this process holds
        for entry in run.iterdir():
            if entry.name != LOCK:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return lock


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _step_folders(run_dir: Path) -> list[Path]:
    """checkpoints/step-* folders, oldest first (whatever their state)."""
    folder = run_dir / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if p.is_dir()] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The finished checkpoint (its manifest written) with the highest step, or None."""
    return next((p for p in reversed(_step_folders(run_dir)) if (p / MANIFEST).is_file()), None)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint `path` ("trainer_state.pt does not match its checksum", ...), or None when
    every file of its manifest is there with the same size and SHA-256."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (its write did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes where {entry['bytes']} were written"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def resume_checkpoint(run_dir: Path) -> Path:
    """The newest intact checkpoint (`checkpoint_problem` is None). The newer ones that are not intact are moved
    aside to checkpoints/corrupt-step-N, with a warning naming each; RunDirError (nothing moved) when none is."""
    bad: list[tuple[Path, str]] = []
    for path in reversed(_step_folders(run_dir)):
        problem = checkpoint_problem(path)
        if problem is not None:
            bad.append((path, problem))
            continue
        for corrupt, why in bad:
            aside = corrupt.with_name(f"corrupt-{corrupt.name}")
            shutil.rmtree(aside, ignore_errors=True)
            corrupt.rename(aside)
            warnings.warn(
                f"{corrupt} is not intact ({why}): moved to {aside.name}; resuming from {path.name}", stacklevel=2
            )
        return path
    problems = "; ".join(f"{path.name}: {why}" for path, why in bad)
    raise RunDirError(
        f"--resume: no intact checkpoint in {run_dir / CHECKPOINTS} ({problems}): "
        "pass --overwrite instead of --resume to start the run again"
    )


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Removes the temporary folders of unfinished writes and all but the newest `keep` finished checkpoints."""
    folder = run_dir / CHECKPOINTS
    for tmp in folder.glob(".tmp-step-*"):
        shutil.rmtree(tmp)
    done = [p for p in _step_folders(run_dir) if (p / MANIFEST).is_file()]
    for old in done[:-keep]:
        shutil.rmtree(old)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    """fsyncs every file under `folder` (and the folders), then writes and fsyncs manifest.json: their sizes and
    SHA-256, the proof that the checkpoint was written whole."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in [*(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _fsync(sub)


def _disk_full(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def save_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], save_model: Callable[[Path], None], cfg: GRPOConfig
) -> Path:
    """Writes checkpoints/step-N atomically (`save_model(folder)` writes the model) and keeps the newest
    `cfg.save_total_limit`. A write that fails for lack of space (or another OSError) removes its temporary folder
    and raises RunDirError; the earlier checkpoints stay."""
    folder = run_dir / CHECKPOINTS
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(tmp / "model")
        save_yaml(cfg, tmp / "config.yaml")
        crash_point("checkpoint")
        torch.save(state, tmp / "trainer_state.pt")
        _write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(folder)
    except Exception as e:
        full = _disk_full(e, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (full or isinstance(e, OSError)):
            raise
        kept = latest_checkpoint(run_dir)
        reason = "no space left on device" if full else e.strerror or str(e)
        raise RunDirError(
            f"cannot write checkpoint {final} ({reason}): the partial write was removed and "
            f"{kept.name if kept else 'no earlier checkpoint'} kept; free space on that disk, then --resume"
        ) from None
    prune_checkpoints(run_dir, cfg.save_total_limit)
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
        """Drops what was logged after `step` (the checkpoint a resumed run continues from) and a torn last line
        (with a warning), and reloads the rest."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.dir / name
            if path.is_file():
                kept = [row for row in _read_jsonl(path) if row["step"] <= step]
                path.write_text("".join(map(_json_line, kept)))
        # null stands for NaN in the file: back to floats, as the table and the plot expect
        self.records = [
            {k: math.nan if v is None else v for k, v in row.items()} for row in _read_jsonl(self.dir / "metrics.jsonl")
        ]

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


def _strict(value: Any) -> Any:
    """`value` with every NaN or infinity (which strict JSON has no word for) replaced by None, i.e. null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(_strict(row), allow_nan=False) + "\n"


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    try:
        with open(path, "a") as f:
            f.writelines(map(_json_line, rows))
    except OSError as e:
        raise RunDirError(f"cannot write {path} ({e.strerror}): free space on that disk, then --resume") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a jsonl file; a torn last line (a kill mid-write) is dropped with a warning naming the file,
    a bad line before it is a RunDirError."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise RunDirError(f"{path}:{number} is not a JSON line: delete that line, then --resume") from None
            warnings.warn(
                f"{path}: dropped its torn last line (a process stopped mid-write): {line[:80]!r}", stacklevel=3
            )
    return rows
