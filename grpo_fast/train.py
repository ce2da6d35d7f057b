"""`python -m grpo_fast.train`: GRPO on a vision-language model (see grpo_fast.trainer for the loop).

With no arguments it runs the embedded default: synthetic data (generated if absent), an SFT warm start of the
tiny InternVL, GRPO with the rule judge, and a before/after table on the val split; everything lands in
runs/grpo-tiny/. Every config field is a flag (`--learning-rate 1e-5` or `--learning_rate 1e-5`); `--config
run.yaml` sets many at once (flags win); `--preset reference` selects docs/design.md's settings for real models.

    python -m grpo_fast.train
    python -m grpo_fast.train --name lr3e-4 --learning-rate 3e-4 --max-steps 200
    python -m grpo_fast.train --name lr3e-4 --resume
    torchrun --nproc_per_node=2 -m grpo_fast.train --batch-size 16 --name ddp
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from grpo_fast import distributed
from grpo_fast.cli import ArgumentParser, build_parser
from grpo_fast.config import PRESETS, ConfigError, GRPOConfig, build_config, coerce, read_config_file
from grpo_fast.data.seed import SeedFormatError
from grpo_fast.kernels.rowwise_torch import set_row_threads
from grpo_fast.rewards.llm_judge import JudgeRequestError, JudgeUnavailableError
from grpo_fast.threads import resolve_threads
from grpo_fast.trainer import UnscorableError, run
from grpo_fast.trainer.run_dir import RunDirError, prepare_run_dir
from grpo_fast.trainer.setup import build_judge, build_policy, load_data, warm_start


def _parser() -> ArgumentParser:
    parser = build_parser(
        GRPOConfig,
        prog="python -m grpo_fast.train",
        description=__doc__.split("\n\n")[0],
        presets={"tiny": PRESETS["tiny"]},
    )
    parser.add_argument("--config", help="YAML file of key: value settings (under the flags)")
    return parser


# What one command does to its run folder; a resumed run does not take these from the run's saved config.
INVOCATION_KEYS = ("resume", "overwrite")


class Stopped(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped


def _run_dir(flags: dict[str, Any]) -> Path:
    """The run folder that settings name, before the saved config is read (nothing validated yet)."""
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    preset = PRESETS.get(flags.get("preset", defaults["preset"]), {})
    value = lambda key: flags.get(key, preset.get(key, defaults[key]))
    return Path(value("output_dir")) / value("name")


def parse_args(argv: list[str] | None = None) -> GRPOConfig:
    """The resolved config; ConfigError (or SystemExit 2 from argparse) on bad input.

    With `--resume` the run's own config.yaml is the lowest layer (under `--config`, then the flags), so the same
    command line continues it and a new flag (a longer `--max-steps`, another `--judge-base-url`) takes effect.
    """
    args: dict[str, Any] = vars(_parser().parse_args(argv))
    config_file = args.pop("config", None)
    flags = {**(read_config_file(config_file) if config_file else {}), **args}
    saved = _run_dir(flags) / "config.yaml"
    if coerce("resume", flags.get("resume", False)) and saved.is_file():
        flags = {k: v for k, v in read_config_file(saved).items() if k not in INVOCATION_KEYS} | flags
    return build_config(flags)


def resume_changes(cfg: GRPOConfig) -> list[str]:
    """`key: saved -> now` for each setting of a resumed run that differs from the run's saved config.yaml."""
    saved = read_config_file(cfg.run_dir / "config.yaml")
    now = cfg.to_dict()
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in INVOCATION_KEYS and saved.get(k) != v]


def main(argv: list[str] | None = None) -> None:
    env = lock = None
    on_sigterm = signal.signal(signal.SIGTERM, _stop)  # torchrun's way of stopping the ranks when one has failed
    try:
        cfg = parse_args(argv)
        env = distributed.init(cfg.dist_timeout_s)
        if cfg.fsdp and env.world == 1:
            raise ConfigError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N")
        # resolved once and written to config.yaml, so that a resumed run keeps the count (and the float rounding)
        cfg.torch_threads = resolve_threads(cfg.torch_threads)
        torch.set_num_threads(cfg.torch_threads)
        set_row_threads(cfg.row_op_threads or None)
        if env.is_main:
            lock = prepare_run_dir(cfg)  # held until the end: a second process in this run folder exits 2
            print("config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
            if cfg.resume and (changes := resume_changes(cfg)):
                print("resume: changed since the run's config.yaml: " + "; ".join(changes))
        distributed.barrier(env)
        train_items, val_items = load_data(cfg, env)
        policy, ref_model = build_policy(cfg, warm_start(cfg, env), env)
        judge = build_judge(cfg.judge, cfg.judge_config)
        try:
            run(cfg, env, policy, ref_model, judge, train_items, val_items)
        finally:
            getattr(judge, "close", lambda: None)()
    except (
        ConfigError,
        SeedFormatError,
        JudgeRequestError,
        JudgeUnavailableError,
        UnscorableError,
        RunDirError,
        distributed.CollectiveError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Stopped:
        where = f"rank {env.rank} of {env.world}" if env is not None and env.world > 1 else "the run"
        print(
            f"error: {where} stopped by SIGTERM (under torchrun: another rank failed first, see torchrun's report); "
            "--resume continues from the last checkpoint",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    finally:
        if lock is not None:
            lock.release()
        signal.signal(signal.SIGTERM, on_sigterm)
        distributed.shutdown()


if __name__ == "__main__":
    main()
