"""`python -m grpo_fast.evaluate`: a checkpoint's completions on a data split, judged as the trainer judges them.

`--model` takes any policy: a warm start (runs/warm-start/checkpoint), a GRPO run's final/ or
checkpoints/step-N/model, an InternVL -hf or Qwen-VL checkpoint (folder or cached hub id), or a preset name (tiny:
freshly initialised with --seed). Decoding is greedy unless `--num-samples K` asks for K sampled completions per
item (seeded: the same flags give the same completions). The evaluation is the trainer's own
(`grpo_fast.trainer.evaluation.evaluate`), so a run's final/ gets the numbers of the run's last evaluation; for a
model inside a run folder the default `--max-new-tokens` is the run's max_completion_length.

    python -m grpo_fast.evaluate --model runs/grpo-tiny/final
    python -m grpo_fast.evaluate --model runs/warm-start/checkpoint --num-samples 4 --temperature 0.7
    python -m grpo_fast.evaluate --model OpenGVLab/InternVL3-2B-hf --data DIR --judge llm --judge-model NAME

Writes <out>/eval.json (the metrics, per level and overall, with the model, data, split, judge and decoding
settings) and <out>/eval_samples.jsonl (one line per completion), and prints the per-level Markdown table.
Bad input (a missing model or data folder, an unknown split, items without the fields the judge needs, checked
before any generation) prints one `error: ...` line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from grpo_fast import distributed
from grpo_fast.cli import build_parser
from grpo_fast.config import (
    DEFAULT_DATA,
    JUDGE_PREFIX,
    AttnImplementation,
    ConfigError,
    JudgeKind,
    check_model,
    option,
    split_judge,
)
from grpo_fast.data.seed import SeedFormatError
from grpo_fast.data.splits import load_split
from grpo_fast.judge_config import LLMJudgeConfig
from grpo_fast.models.policy import load_policy
from grpo_fast.rewards.judge import Judge
from grpo_fast.rewards.llm_judge import JudgeRequestError, JudgeUnavailableError
from grpo_fast.threads import resolve_threads
from grpo_fast.trainer.evaluation import Evaluation, Sampling, evaluate, format_levels
from grpo_fast.trainer.precision import has_flash_attn, resolve_precision
from grpo_fast.trainer.setup import build_judge

DEFAULT_MAX_NEW_TOKENS = 512  # GRPOConfig's max_completion_length


@dataclass
class EvalConfig:
    """What to evaluate and how; `python -m grpo_fast.evaluate --help` lists each field under its section."""

    # model
    model: str = option("", "policy folder, hub id or preset name (tiny); required", "model")
    attn_implementation: AttnImplementation = option(
        "auto", "auto (sdpa: evaluation forwards run in fp32, which flash-attn rejects), sdpa, eager", "model"
    )
    torch_threads: int = option(
        0, "CPU threads for torch ops (0: auto, one per core other processes leave idle)", "model"
    )
    # data
    data: str = option(DEFAULT_DATA, "data folder holding <split>.jsonl (images beside it)", "data")
    split: str = option("val", "the split to evaluate: <data>/<split>.jsonl", "data")
    max_items: int = option(0, "evaluate the split's first N items (0: all)", "data")
    # decoding
    num_samples: int = option(0, "sampled completions per item (0: one greedy completion)", "decoding")
    temperature: float = option(1.0, "sampling temperature (with --num-samples)", "decoding")
    top_k: int = option(0, "sample among the k likeliest tokens (0: all; with --num-samples)", "decoding")
    top_p: float = option(1.0, "nucleus sampling mass (with --num-samples)", "decoding")
    seed: int = option(0, "seed of the sampling (and of a preset model's initialisation)", "decoding")
    max_new_tokens: int | None = option(
        None,
        "completion tokens at most (None: the run's max_completion_length for a model in a run folder, else 512)",
        "decoding",
    )
    batch_size: int = option(64, "completions per generate call", "decoding")
    # judge
    judge: JudgeKind = option(
        "rule", "rule (offline, synthetic data) or llm (OpenAI-compatible endpoint, --judge-*)", "judge"
    )
    judge_config: LLMJudgeConfig = field(
        default_factory=LLMJudgeConfig, metadata={"section": "judge", "prefix": JUDGE_PREFIX}
    )
    # output
    out: str = option("runs/eval", "folder for eval.json and eval_samples.jsonl (both replaced)", "output")

    def validate(self) -> None:
        """Raises ConfigError on the first bad value (the model's existence included)."""
        if not self.model:
            raise ConfigError("--model is required: a policy folder, hub id or preset name (tiny)")
        check_model(self.model)
        for name in ("max_items", "num_samples", "top_k", "torch_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> Sampling | None:
        """The sampled decoding asked for, or None for greedy."""
        if not self.num_samples:
            return None
        return Sampling(self.num_samples, self.temperature, self.top_k, self.top_p, self.seed)


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """The validated settings: dataclass defaults under the flags; ConfigError (or SystemExit 2) on bad input."""
    parser = build_parser(EvalConfig, prog="python -m grpo_fast.evaluate", description=__doc__.split("\n\n")[0])
    values, judge_config = split_judge(vars(parser.parse_args(argv)))
    cfg = EvalConfig(**values, judge_config=judge_config)
    cfg.validate()
    return cfg


def resolve_max_new_tokens(cfg: EvalConfig) -> tuple[int, str]:
    """(max_new_tokens, where it came from): the flag; else the max_completion_length of the run whose config.yaml
    sits beside the model folder (a run's final/, a checkpoint's model/); else DEFAULT_MAX_NEW_TOKENS."""
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens, "--max-new-tokens"
    config = Path(cfg.model).parent / "config.yaml"
    if Path(cfg.model).is_dir() and config.is_file():
        try:
            saved = yaml.safe_load(config.read_text())
        except yaml.YAMLError:  # not a run's config
            saved = None
        if isinstance(saved, dict) and isinstance(saved.get("max_completion_length"), int):
            return saved["max_completion_length"], f"max_completion_length of {config}"
    return DEFAULT_MAX_NEW_TOKENS, "the default"


def check_fields(items: list[dict[str, Any]], judge: Judge, kind: JudgeKind, where: str) -> None:
    """ConfigError naming the first item that lacks a field the judge needs to score it."""
    for n, item in enumerate(items, start=1):
        missing = [name for name in judge.required_fields if item.get(name) is None]
        if missing:
            hint = " (the rule judge scores the synthetic data; --judge llm scores any data)" if kind == "rule" else ""
            raise ConfigError(f"{where}: item {n} lacks {', '.join(missing)}, which the {kind} judge needs{hint}")


def _finite(value: Any) -> Any:
    """`value` with NaN floats (nothing scored) as None, so that eval.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(cfg: EvalConfig, result: Evaluation, max_new_tokens: int, seconds: float) -> Path:
    """eval.json and eval_samples.jsonl in cfg.out; returns the folder."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    decoding: dict[str, Any] = {"mode": "sampled" if cfg.sampling else "greedy", "max_new_tokens": max_new_tokens}
    if cfg.sampling:
        decoding |= dataclasses.asdict(cfg.sampling)
    judge: dict[str, Any] = {"kind": cfg.judge}
    if cfg.judge == "llm":
        judge |= dataclasses.asdict(cfg.judge_config)
    summary = {
        "model": cfg.model,
        "data": cfg.data,
        "split": cfg.split,
        "judge": judge,
        "decoding": decoding,
        "items": int(result.metrics["eval/items"]),
        "completions": len(result.records),
        "metrics": _finite(result.metrics),
        "levels": _finite(result.levels),
        "seconds": round(seconds, 1),
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "eval_samples.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in result.records)
    return out


def main(argv: list[str] | None = None) -> None:
    judge = None
    try:
        cfg = parse_args(argv)
        where = str(Path(cfg.data) / f"{cfg.split}.jsonl")
        items = load_split(cfg.data, cfg.split)
        items = items[: cfg.max_items] if cfg.max_items else items
        judge = build_judge(cfg.judge, cfg.judge_config)
        check_fields(items, judge, cfg.judge, where)
        env = distributed.init()
        torch.set_num_threads(resolve_threads(cfg.torch_threads))
        try:
            policy = load_policy(cfg.model, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        precision = resolve_precision(env.device.type, False, has_flash_attn(), cfg.attn_implementation, False)
        policy.model.set_attn_implementation(precision.attn_implementation)
        policy.model.to(env.device)
        tokens, source = resolve_max_new_tokens(cfg)
        if env.is_main:
            mode = f"{cfg.num_samples} sampled completions each" if cfg.sampling else "greedy"
            print(f"evaluating {cfg.model} on {where} ({len(items)} items, {mode}, {cfg.judge} judge)")
            print(f"max_new_tokens {tokens} ({source})")
        start = time.perf_counter()
        result = evaluate(
            policy, items, judge, env, batch_size=cfg.batch_size, max_new_tokens=tokens, sampling=cfg.sampling
        )
        if env.is_main:
            out = write_results(cfg, result, tokens, time.perf_counter() - start)
            print(format_levels(result.levels))
            print(f"wrote {out / 'eval.json'} and {out / 'eval_samples.jsonl'}")
    except (ConfigError, SeedFormatError, JudgeRequestError, JudgeUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if judge is not None:
            getattr(judge, "close", lambda: None)()
        distributed.shutdown()


if __name__ == "__main__":
    main()
