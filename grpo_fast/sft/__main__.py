"""`python -m grpo_fast.sft`: the supervised warm start on its own (see grpo_fast.sft.text)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from grpo_fast.cli import build_parser
from grpo_fast.sft import text
from grpo_fast.sft.text import SFTConfig, train


def parse_args(argv: list[str] | None = None) -> SFTConfig:
    """The SFT settings: the dataclass defaults under the flags given; exit code 2 on bad input."""
    parser = build_parser(SFTConfig, prog="python -m grpo_fast.sft", description=text.__doc__.split("\n")[0])
    return SFTConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    print("sft config:", json.dumps(dataclasses.asdict(cfg)))
    try:
        metrics = train(cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    print(f"checkpoint: {Path(cfg.out) / 'checkpoint'}  loss curve: {Path(cfg.out) / 'loss.png'}")


if __name__ == "__main__":
    main()
