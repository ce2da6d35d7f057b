"""The GRPO run configuration: one dataclass of plain, commented defaults, named presets, YAML and CLI overrides.

GRPO knobs carry TRL's `GRPOConfig` names and defaults (beta 0.0, epsilon 0.2, loss_type "dapo", ...); a preset
overrides some of them: "tiny" (the default: the built-in model on 2 CPU cores, ~11 minutes end to end) and
"reference" (DESIGN.md's settings for a 2B VLM with LoRA). Precedence, lowest first: dataclass defaults, the
preset, `--config file.yaml`, `--key value` flags. Every bad value raises `ConfigError` with one line that says
what to fix.

Batch semantics follow TRL: `batch_size` counts completions per device and micro-step, so it holds
`batch_size / num_generations` prompts, and a group's G completions always sit in one micro-batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpo_fast.models.policy import PRESETS as MODEL_PRESETS
from grpo_fast.rewards.llm_judge import LLMJudgeConfig


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field and the fix."""


def _f(default: Any, help: str, section: str) -> Any:
    return field(default=default, metadata={"help": help, "section": section})


@dataclass
class GRPOConfig:
    """Everything a run needs; `python -m grpo_fast.train --help` lists each field under its section."""

    # run
    preset: str = _f("tiny", "named preset applied under the config file and flags: tiny, reference, none", "run")
    name: str = _f("grpo-tiny", "run name: artifacts go to <output_dir>/<name>/", "run")
    output_dir: str = _f("runs", "parent folder of runs", "run")
    overwrite: bool = _f(False, "replace an existing run of the same name", "run")
    resume: bool = _f(False, "continue the run in <output_dir>/<name>/ from its latest checkpoint", "run")
    seed: int = _f(0, "seed of data order, sampling and initialisation", "run")
    torch_threads: int = _f(0, "CPU threads for torch ops (0: torch's default, one per core)", "run")
    max_steps: int = _f(100, "GRPO steps (each: rollouts, then num_iterations optimizer updates)", "run")
    # data
    data: str = _f(
        "data/synthetic", "folder with train.jsonl and val.jsonl (synthetic data is generated if absent)", "data"
    )
    n: int = _f(2000, "synthetic items to generate when the data folder is absent", "data")
    skip_bad_lines: bool = _f(False, "skip (and count) bad dataset lines instead of failing", "data")
    # model
    model: str = _f(
        "tiny", "preset name (tiny), or InternVL -hf / Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder or hub id", "model"
    )
    warm_start: bool = _f(True, "SFT warm start first when --model is a preset (grpo_fast.sft)", "model")
    warm_start_dir: str | None = _f(
        None, "where the warm start is written and reused from (None: <output_dir>/warm-start)", "model"
    )
    sft_steps: int | None = _f(None, "warm start: SFT optimizer steps (None: grpo_fast.sft's default)", "model")
    sft_vision_steps: int | None = _f(
        None, "warm start: vision pretraining steps before SFT (None: grpo_fast.sft's default)", "model"
    )
    lora: int = _f(0, "LoRA rank on all attention and MLP projections (0: full fine-tuning; needs peft)", "model")
    lora_alpha: int = _f(16, "LoRA alpha", "model")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward to save memory", "model")
    bf16: bool = _f(False, "bf16 autocast (CUDA only; ignored on CPU)", "model")
    attn_implementation: str = _f(
        "auto", "auto (flash_attention_2 on CUDA when installed, else sdpa), sdpa, eager", "model"
    )
    use_liger: bool = _f(False, "apply Liger's model patches (CUDA, liger-kernel installed)", "model")
    # generation
    num_generations: int = _f(8, "G: completions sampled per prompt", "generation")
    max_prompt_length: int | None = _f(
        None, "prompt tokens at most, image tokens included (None: no limit)", "generation"
    )
    max_completion_length: int = _f(512, "completion tokens at most", "generation")
    temperature: float = _f(1.0, "sampling temperature (also divides the logits in the loss, as TRL)", "generation")
    top_p: float = _f(1.0, "nucleus sampling mass", "generation")
    top_k: int = _f(0, "sample among the k likeliest tokens (0: all)", "generation")
    mask_truncated_completions: bool = _f(
        False, "leave completions cut at max_completion_length out of the loss", "generation"
    )
    # reward
    judge: str = _f("rule", "rule (offline, synthetic data) or llm (OpenAI-compatible endpoint, --judge-*)", "reward")
    scale_rewards: str = _f("group", "advantage scale: group (group std), batch (batch std), none", "reward")
    # optimisation (TRL names and defaults)
    batch_size: int = _f(8, "completions per device per micro-step (a multiple of num_generations)", "optimization")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer update", "optimization")
    num_iterations: int = _f(1, "mu: optimizer updates per batch of rollouts (old log-probs when > 1)", "optimization")
    learning_rate: float = _f(1e-6, "peak AdamW learning rate", "optimization")
    lr_scheduler_type: str = _f("linear", "decay after warm-up: linear, cosine or constant", "optimization")
    warmup_steps: int = _f(0, "linear warm-up updates", "optimization")
    weight_decay: float = _f(0.0, "AdamW weight decay", "optimization")
    adam_beta1: float = _f(0.9, "AdamW beta1", "optimization")
    adam_beta2: float = _f(0.999, "AdamW beta2", "optimization")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", "optimization")
    # loss (TRL names and defaults)
    beta: float = _f(0.0, "KL coefficient against the reference policy (0: no reference model)", "loss")
    epsilon: float = _f(0.2, "lower clip range of the ratio", "loss")
    epsilon_high: float | None = _f(None, "upper clip range (None: epsilon)", "loss")
    delta: float | None = _f(None, "two-sided clipping: cap on the ratio (None: off)", "loss")
    loss_type: str = _f("dapo", "aggregation: grpo, bnpo, dapo or dr_grpo", "loss")
    importance_sampling_level: str = _f("token", "token or sequence (GSPO)", "loss")
    # logging, evaluation, checkpoints
    logging_steps: int = _f(1, "write metrics.jsonl every N steps", "logging")
    log_samples: int = _f(4, "completions written to samples.jsonl per logged step", "logging")
    eval_steps: int = _f(0, "greedy val evaluation every N steps (0: only before and after)", "logging")
    eval_items: int = _f(0, "val items per evaluation (0: the whole split)", "logging")
    eval_batch_size: int = _f(64, "val items per generate call", "logging")
    save_steps: int = _f(50, "checkpoint every N steps (and at the end)", "logging")
    save_total_limit: int = _f(2, "checkpoints kept (oldest deleted first)", "logging")
    report_to: str = _f("none", "also log to: none, tensorboard or wandb", "logging")
    # distributed
    fsdp: bool = _f(
        False, "shard parameters, gradients and optimizer state over torchrun processes with FSDP2", "distributed"
    )
    # the LLM judge's settings, flattened as judge_<field> (see grpo_fast.rewards.llm_judge.LLMJudgeConfig)
    judge_config: LLMJudgeConfig = field(default_factory=LLMJudgeConfig, metadata={"section": "judge"})

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def prompts_per_batch(self) -> int:
        return self.batch_size // self.num_generations

    def validate(self) -> None:
        """Raises ConfigError on the first inconsistent value."""
        if self.preset not in PRESETS and self.preset != "none":
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, none; got {self.preset!r}")
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations must be >= 2 (a group needs two completions), got {self.num_generations}"
            )
        if self.batch_size < 1 or self.batch_size % self.num_generations:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a positive multiple of num_generations ({self.num_generations})"
            )
        for name in (
            "max_steps",
            "gradient_accumulation_steps",
            "num_iterations",
            "max_completion_length",
            "logging_steps",
            "save_steps",
            "save_total_limit",
            "eval_batch_size",
            "n",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "beta",
            "epsilon",
            "weight_decay",
            "max_grad_norm",
            "warmup_steps",
            "top_k",
            "lora",
            "eval_steps",
            "eval_items",
            "log_samples",
            "torch_threads",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_prompt_length", "sft_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.sft_vision_steps is not None and self.sft_vision_steps < 0:
            raise ConfigError(f"sft_vision_steps must be >= 0 or None, got {self.sft_vision_steps}")
        choices = {
            "lr_scheduler_type": ("linear", "cosine", "constant"),
            "loss_type": ("grpo", "bnpo", "dapo", "dr_grpo"),
            "importance_sampling_level": ("token", "sequence"),
            "scale_rewards": ("group", "batch", "none"),
            "judge": ("rule", "llm"),
            "report_to": ("none", "tensorboard", "wandb"),
            "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.name in ("", ".", "..") or "/" in self.name:
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}")
        if (
            self.model not in MODEL_PRESETS
            and not Path(self.model).exists()
            and (self.model.startswith(("/", ".", "~")) or self.model.count("/") != 1)
        ):  # not a hub id ("org/name") either
            raise ConfigError(
                f"model {self.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing folder"
            )
        needs = {
            "tensorboard": self.report_to == "tensorboard",
            "wandb": self.report_to == "wandb",
            "peft": self.lora > 0,
        }
        for package, needed in needs.items():
            if needed and importlib.util.find_spec(package) is None:
                flag = "--lora" if package == "peft" else f"--report-to {package}"
                raise ConfigError(f"{flag} needs the {package} package: pip install {package}")
        if self.fsdp and self.lora:
            raise ConfigError("--fsdp shards full fine-tuning only: drop --lora (or --fsdp)")
        if self.judge == "llm" and not self.judge_config.model:
            raise ConfigError("--judge llm needs the judge model's name: pass --judge-model NAME")

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (judge_config as judge_<field>), the form config.yaml and the CLI use."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "judge_config"}
        out |= {f"judge_{k}": v for k, v in dataclasses.asdict(self.judge_config).items()}
        return out


# Presets: overrides of the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The tiny InternVL on 2 CPU cores: after the warm start (~7 minutes), ~4 minutes of GRPO; a high learning rate
    # and short completions suit a ~1.1 M-parameter model whose replies are one or two sentences.
    "tiny": {
        "name": "grpo-tiny",
        # One thread: the tiny model's matrices are too small for intra-op parallelism to pay, and on a busy
        # 2-core machine OpenMP's thread synchronisation made a rollout 4x slower in wall time (measured).
        "torch_threads": 1,
        # Tuned on the warm starts (val reward of greedy replies, 200 items; see README "Training"): lr 1e-4 moved
        # the policy within ~50 steps where 5e-5 needed ~100 and 2e-4 stalled or swung between "always ask" and
        # "always answer"; sampling at temperature 0.7 beat 1.0; a KL anchor (beta 0.04) held it steadier; longer
        # runs drifted towards asking with wrong facts, so 150 steps.
        "max_steps": 150,
        "num_generations": 4,
        "batch_size": 32,
        "max_completion_length": 40,
        "temperature": 0.7,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 5,
        "beta": 0.04,
        "save_steps": 50,
        "eval_steps": 50,
        "eval_items": 0,
    },
    # DESIGN.md "Reference settings": a 2B VLM from an SFT checkpoint, LoRA r=8, 5e-6 cosine, G=2, batch 4 per
    # device, accumulation 2, prompt 250 / completion 200 tokens, beta 0.01, bf16, 3 epochs (~ steps given
    # by the data: set --max-steps to epochs x train items / (batch x accumulation / G x devices)).
    "reference": {
        "name": "grpo-reference",
        "model": "OpenGVLab/InternVL3-2B-hf",
        "warm_start": False,
        "lora": 8,
        "lora_alpha": 16,
        "learning_rate": 5e-6,
        "lr_scheduler_type": "cosine",
        "num_generations": 2,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_prompt_length": 250,
        "max_completion_length": 200,
        "beta": 0.01,
        "bf16": True,
        "gradient_checkpointing": True,
        "max_steps": 1000,
        "save_steps": 100,
        "eval_steps": 100,
        "eval_items": 200,
        "eval_batch_size": 16,
    },
}

JUDGE_FIELDS = {f"judge_{f.name}": f for f in dataclasses.fields(LLMJudgeConfig)}


def fields_by_name() -> dict[str, dataclasses.Field]:
    """Every settable key (judge settings flattened as judge_<field>) -> its dataclass field."""
    out = {f.name: f for f in dataclasses.fields(GRPOConfig) if f.name != "judge_config"}
    return out | JUDGE_FIELDS


def _annotation(f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(LLMJudgeConfig if f in JUDGE_FIELDS.values() else GRPOConfig)
    return hints[f.name]


def coerce(key: str, value: Any) -> Any:
    """`value` (a YAML value or a CLI string) converted to the type of field `key`; ConfigError when impossible."""
    fields = fields_by_name()
    if key not in fields:
        raise ConfigError(f"unknown config key {key!r} (see --help for the list)")
    kind = _annotation(fields[key])
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
    if typing.get_origin(base) is typing.Literal:
        base = str
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {base.__name__}, got {value!r}") from None


def build_config(overrides: dict[str, Any], config_file: str | Path | None = None) -> GRPOConfig:
    """Dataclass defaults < preset < `config_file` (YAML mapping) < `overrides`; validated."""
    layers: list[dict[str, Any]] = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
        layers.append({k.replace("-", "_"): v for k, v in loaded.items()})
    layers.append(overrides)
    preset = "tiny"
    for layer in layers:
        preset = layer.get("preset", preset)
    if preset not in PRESETS and preset != "none":
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, none; got {preset!r}")
    values: dict[str, Any] = dict(PRESETS.get(preset, {}))
    for layer in layers:
        values |= {key: coerce(key, value) for key, value in layer.items()}
    values["preset"] = preset
    judge = {k.removeprefix("judge_"): values.pop(k) for k in list(values) if k in JUDGE_FIELDS}
    try:
        cfg = GRPOConfig(**values, judge_config=LLMJudgeConfig(**judge))
    except ValueError as e:  # LLMJudgeConfig's own checks
        raise ConfigError(str(e)) from None
    cfg.validate()
    return cfg


def save_yaml(cfg: GRPOConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
