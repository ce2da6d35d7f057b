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

import sys
from typing import Any

import torch
import yaml

from grpo_fast import distributed
from grpo_fast.cli import ArgumentParser, build_parser
from grpo_fast.config import PRESETS, ConfigError, GRPOConfig, build_config
from grpo_fast.data.seed import SeedFormatError
from grpo_fast.rewards.llm_judge import JudgeRequestError, JudgeUnavailableError
from grpo_fast.trainer import run
from grpo_fast.trainer.run_dir import prepare_run_dir
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


def parse_args(argv: list[str] | None = None) -> GRPOConfig:
    """The resolved config; ConfigError (or SystemExit 2 from argparse) on bad input.

    With `--resume` and no `--config`, the run's own config.yaml is the base, so the same command line continues it.
    """
    args: dict[str, Any] = vars(_parser().parse_args(argv))
    config_file = args.pop("config", None)
    cfg = build_config(args, config_file)
    saved = cfg.run_dir / "config.yaml"
    if cfg.resume and config_file is None and saved.is_file():
        cfg = build_config(args, saved)
    return cfg


def main(argv: list[str] | None = None) -> None:
    env = None
    try:
        cfg = parse_args(argv)
        env = distributed.init()
        if cfg.fsdp and env.world == 1:
            raise ConfigError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N")
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        if env.is_main:
            prepare_run_dir(cfg)
            print("config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        distributed.barrier(env)
        train_items, val_items = load_data(cfg, env)
        policy, ref_model = build_policy(cfg, warm_start(cfg, env), env)
        judge = build_judge(cfg)
        try:
            run(cfg, env, policy, ref_model, judge, train_items, val_items)
        finally:
            getattr(judge, "close", lambda: None)()
    except (ConfigError, SeedFormatError, JudgeRequestError, JudgeUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
