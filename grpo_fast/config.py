"""The GRPO run configuration: one dataclass of plain, commented defaults, named presets, YAML and CLI overrides.

GRPO knobs carry TRL's `GRPOConfig` names and defaults (beta 0.0, epsilon 0.2, loss_type "dapo", ...); a preset
overrides some of them: "tiny" (the default: the built-in model on 2 CPU cores, 7-17 minutes end to end) and
"reference" (docs/design.md's settings for a 2B VLM with LoRA). Precedence, lowest first: dataclass defaults, the
preset, `--config file.yaml`, `--key value` flags. Every bad value raises `ConfigError` with one line that says
what to fix.

Batch semantics follow TRL: `batch_size` counts completions per device and micro-step, so it holds
`batch_size / num_generations` prompts, and a group's G completions always sit in one micro-batch.

Every choice is a Literal alias declared here once (`LossType`, ...; `choices(alias)` lists its values), read by
the validation, the command line (`grpo_fast.cli`) and the kernels' argument checks. `settings(schema)` lists the
settable keys of a settings dataclass (the judge's flattened as judge_<field>) with their real types, and
`convert` turns a YAML or command-line value into one. This module imports only the standard library and yaml (and
the judge settings' stdlib-only dataclass), so any module may import it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from grpo_fast.judge_config import LLMJudgeConfig

# Every choice a field, flag or kernel argument takes, declared once; `choices(alias)` lists the values.
LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
ScaleRewards = Literal["group", "batch", "none"]
LRSchedulerType = Literal["linear", "cosine", "constant"]
JudgeKind = Literal["rule", "llm"]
ReportTo = Literal["none", "tensorboard", "wandb"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
MultiObjectiveAggregation = Literal["sum_then_normalize", "normalize_then_sum"]  # several reward functions (TRL's)

# GRPOConfig.judge_config's fields are the keys judge_<field> (flags --judge-<field>).
JUDGE_PREFIX = "judge_"
# The one data folder generated when absent (any other --data must exist).
DEFAULT_DATA = "data/synthetic"
# The built-in model presets (grpo_fast.models.policy.PRESETS builds them; a test keeps the two in step).
MODEL_PRESETS = ("tiny",)


def choices(alias: Any) -> tuple[str, ...]:
    """The values of a Literal alias, in declaration order: `choices(LossType) == ("grpo", "bnpo", ...)`."""
    return typing.get_args(alias)


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field and the fix."""


def option(default: Any, help: str, section: str) -> Any:
    """A dataclass field with its `--help` text and the help section (argument group) it is listed under."""
    return field(default=default, metadata={"help": help, "section": section})


@dataclass
class GRPOConfig:
    """Everything a run needs; `python -m grpo_fast.train --help` lists each field under its section."""

    # run
    preset: str = option("tiny", "named preset applied under the config file and flags: tiny, reference, none", "run")
    name: str = option("grpo-tiny", "run name: artifacts go to <output_dir>/<name>/", "run")
    output_dir: str = option("runs", "parent folder of runs", "run")
    overwrite: bool = option(False, "replace an existing run of the same name", "run")
    resume: bool = option(False, "continue the run in <output_dir>/<name>/ from its latest checkpoint", "run")
    seed: int = option(0, "seed of data order, sampling and initialisation", "run")
    torch_threads: int = option(
        0, "CPU threads for torch ops (0: auto, one per core that other processes leave idle at start)", "run"
    )
    row_op_threads: int = option(
        0,
        "CPU threads of the loss's row ops between its lm_head GEMMs (0: torch_threads; see "
        "grpo_fast.kernels.rowwise_torch.set_row_threads)",
        "run",
    )
    max_steps: int = option(100, "GRPO steps (each: rollouts, then num_iterations optimizer updates)", "run")
    # data
    data: str = option(
        DEFAULT_DATA,
        f"folder with train.jsonl and val.jsonl (synthetic data is generated when {DEFAULT_DATA}, the default, is "
        "absent; another folder must exist)",
        "data",
    )
    synthetic_items: int = option(2000, f"synthetic items to generate when {DEFAULT_DATA} is absent", "data")
    skip_bad_lines: bool = option(False, "skip (and count) bad dataset lines instead of failing", "data")
    # model
    model: str = option(
        "tiny", "preset name (tiny), or InternVL -hf / Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder or hub id", "model"
    )
    warm_start: bool = option(True, "SFT warm start first when --model is a preset (grpo_fast.sft)", "model")
    warm_start_dir: str | None = option(
        None, "where the warm start is written and reused from (None: <output_dir>/warm-start)", "model"
    )
    sft_steps: int | None = option(None, "warm start: SFT optimizer steps (None: grpo_fast.sft's default)", "model")
    sft_vision_steps: int | None = option(
        None, "warm start: vision pretraining steps before SFT (None: grpo_fast.sft's default)", "model"
    )
    lora: int = option(0, "LoRA rank on all attention and MLP projections (0: full fine-tuning; needs peft)", "model")
    lora_alpha: int = option(16, "LoRA alpha", "model")
    freeze_vision_tower: bool = option(
        False,
        "keep the vision tower's weights (LoRA adapters included) fixed; InternVL's projector still trains, Qwen-VL's "
        "merger is part of its tower",
        "model",
    )
    gradient_checkpointing: bool = option(False, "recompute activations in the backward to save memory", "model")
    bf16: bool = option(False, "bf16 autocast (CUDA only; ignored on CPU)", "model")
    cast_lm_head_to_fp32: bool = option(
        False, "under --bf16, run the lm_head GEMMs (logits, their gradients) in fp32 rather than bf16", "model"
    )
    attn_implementation: AttnImplementation = option(
        "auto", "auto (flash_attention_2 on CUDA under --bf16 when installed, else sdpa), sdpa, eager", "model"
    )
    use_liger: bool = option(False, "apply Liger's model patches (CUDA, liger-kernel installed)", "model")
    # generation
    num_generations: int = option(8, "G: completions sampled per prompt", "generation")
    max_prompt_length: int | None = option(
        None, "prompt tokens at most, image tokens included (None: no limit)", "generation"
    )
    max_completion_length: int = option(512, "completion tokens at most", "generation")
    temperature: float = option(1.0, "sampling temperature (also divides the logits in the loss, as TRL)", "generation")
    top_p: float = option(1.0, "nucleus sampling mass", "generation")
    top_k: int = option(0, "sample among the k likeliest tokens (0: all)", "generation")
    mask_truncated_completions: bool = option(
        False, "leave completions cut at max_completion_length out of the loss", "generation"
    )
    mask_zero_std_groups: bool = option(
        False,
        "leave every group whose rewards are all equal (frac_reward_zero_std: no advantage) out of the loss and its "
        "forward passes, KL term included: DAPO's group filter, without refilling the batch",
        "generation",
    )
    # reward
    judge: JudgeKind = option(
        "rule", "rule (offline, synthetic data) or llm (OpenAI-compatible endpoint, --judge-*)", "reward"
    )
    scale_rewards: ScaleRewards = option(
        "group", "advantage scale: group (group std), batch (batch std), none", "reward"
    )
    multi_objective_aggregation: MultiObjectiveAggregation = option(
        "sum_then_normalize",
        "several reward functions: sum_then_normalize (weighted sum, then scale_rewards) or normalize_then_sum "
        "(GDPO: each function normalized within its groups, the weighted sum over the batch)",
        "reward",
    )
    max_unscorable_fraction: float = option(
        0.5,
        "stop (exit 2, checkpoint saved) when more than this share of a step's completions is unscorable for "
        "unscorable_patience steps in a row (1: never stop)",
        "reward",
    )
    unscorable_patience: int = option(3, "steps in a row over max_unscorable_fraction before the run stops", "reward")
    # optimisation (TRL names and defaults)
    batch_size: int = option(8, "completions per device per micro-step (a multiple of num_generations)", "optimization")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer update", "optimization")
    num_iterations: int = option(
        1, "mu: optimizer updates per batch of rollouts (old log-probs when > 1)", "optimization"
    )
    learning_rate: float = option(1e-6, "peak AdamW learning rate", "optimization")
    lr_scheduler_type: LRSchedulerType = option(
        "linear", "decay after warm-up: linear, cosine or constant", "optimization"
    )
    warmup_steps: int = option(0, "linear warm-up updates", "optimization")
    weight_decay: float = option(0.0, "AdamW weight decay", "optimization")
    adam_beta1: float = option(0.9, "AdamW beta1", "optimization")
    adam_beta2: float = option(0.999, "AdamW beta2", "optimization")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)", "optimization")
    # loss (TRL names and defaults)
    beta: float = option(0.0, "KL coefficient against the reference policy (0: no reference model)", "loss")
    epsilon: float = option(0.2, "lower clip range of the ratio", "loss")
    epsilon_high: float | None = option(None, "upper clip range (None: epsilon)", "loss")
    delta: float | None = option(None, "two-sided clipping: cap on the ratio (None: off)", "loss")
    loss_type: LossType = option(
        "dapo",
        "clipped surrogate normalized per sequence (grpo), per token (bnpo, dapo), by B x max_completion_length "
        "(dr_grpo) or per sequence sum (luspo); cispo (clipped IS weight x log-prob), sapo (sigmoid-gated), vespo "
        "(gamma-weighted sequences)",
        "loss",
    )
    importance_sampling_level: ImportanceSamplingLevel = option("token", "token or sequence (GSPO)", "loss")
    sapo_temperature_pos: float = option(1.0, "sapo: gate temperature for tokens with positive advantage", "loss")
    sapo_temperature_neg: float = option(1.05, "sapo: gate temperature for the others", "loss")
    vespo_k_pos: float = option(2.0, "vespo: power k of the gamma weight for advantages >= 0", "loss")
    vespo_lambda_pos: float = option(3.0, "vespo: decay lambda of the gamma weight for advantages >= 0", "loss")
    vespo_k_neg: float = option(3.0, "vespo: power k for negative advantages", "loss")
    vespo_lambda_neg: float = option(2.0, "vespo: decay lambda for negative advantages", "loss")
    off_policy_mask_threshold: float | None = option(
        None, "drop negative-advantage sequences whose mean KL from the sampler exceeds this (None: off)", "loss"
    )
    use_bias_correction_kl: bool = option(
        True, "weight the KL term by the importance ratio (DeepSeek-V3.2's unbiased KL gradient)", "loss"
    )
    top_entropy_quantile: float = option(
        1.0, "loss on this top fraction of tokens by entropy, over the whole batch (1.0: all tokens)", "loss"
    )
    entropy_coef: float = option(0.0, "entropy bonus coefficient (the initial one when adaptive)", "loss")
    use_adaptive_entropy: bool = option(
        False, "adapt entropy_coef each update: up by entropy_coef_delta below entropy_target, down above", "loss"
    )
    entropy_coef_min: float = option(0.0, "adaptive entropy: lower bound of entropy_coef", "loss")
    entropy_coef_max: float = option(1.0, "adaptive entropy: upper bound of entropy_coef", "loss")
    entropy_coef_delta: float = option(0.005, "adaptive entropy: step of entropy_coef per update", "loss")
    entropy_target: float = option(
        0.2, "adaptive entropy: the bonus applies while the mean entropy (nats) is at or below this", "loss"
    )
    # logging, evaluation, checkpoints
    logging_steps: int = option(1, "write metrics.jsonl every N steps", "logging")
    log_samples: int = option(4, "completions written to samples.jsonl per logged step", "logging")
    eval_steps: int = option(0, "greedy val evaluation every N steps (0: only before and after)", "logging")
    eval_items: int = option(0, "val items per evaluation (0: the whole split)", "logging")
    eval_batch_size: int = option(64, "val items per generate call", "logging")
    save_steps: int = option(50, "checkpoint every N steps (and at the end)", "logging")
    save_total_limit: int = option(2, "checkpoints kept (oldest deleted first)", "logging")
    report_to: ReportTo = option("none", "also log to: none, tensorboard or wandb", "logging")
    # distributed
    fsdp: bool = option(
        False, "shard parameters, gradients and optimizer state over torchrun processes with FSDP2", "distributed"
    )
    dist_timeout_s: float = option(
        1800.0,
        "seconds a collective waits for the other processes before the run stops with an error (a rank that hangs "
        "or cannot be reached); longer than rank 0's slowest checkpoint write",
        "distributed",
    )
    # the LLM judge's settings, flattened as judge_<field> (see grpo_fast.judge_config.LLMJudgeConfig)
    judge_config: LLMJudgeConfig = field(
        default_factory=LLMJudgeConfig, metadata={"section": "judge", "prefix": JUDGE_PREFIX}
    )

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
                f"batch_size ({self.batch_size}) must be a positive multiple of num_generations "
                f"({self.num_generations})"
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
            "synthetic_items",
            "unscorable_patience",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "beta",
            "epsilon",
            "entropy_coef",
            "entropy_coef_min",
            "entropy_coef_max",
            "entropy_coef_delta",
            "vespo_k_pos",
            "vespo_lambda_pos",
            "vespo_k_neg",
            "vespo_lambda_neg",
            "weight_decay",
            "max_grad_norm",
            "warmup_steps",
            "top_k",
            "lora",
            "eval_steps",
            "eval_items",
            "log_samples",
            "torch_threads",
            "row_op_threads",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.max_unscorable_fraction <= 1:
            raise ConfigError(f"max_unscorable_fraction must be in [0, 1], got {self.max_unscorable_fraction}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ConfigError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ConfigError(f"off_policy_mask_threshold must be >= 0 or None, got {self.off_policy_mask_threshold}")
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ConfigError(f"entropy_coef_min ({self.entropy_coef_min}) must be <= entropy_coef_max "
                              f"({self.entropy_coef_max})")
        for name in ("max_prompt_length", "sft_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.sft_vision_steps is not None and self.sft_vision_steps < 0:
            raise ConfigError(f"sft_vision_steps must be >= 0 or None, got {self.sft_vision_steps}")
        hints = typing.get_type_hints(GRPOConfig)
        for name, kind in hints.items():
            if typing.get_origin(kind) is Literal and getattr(self, name) not in (allowed := choices(kind)):
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.name in ("", ".", "..") or "/" in self.name:
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run and --overwrite replaces it: pass one of them")
        if Path(self.data) != Path(DEFAULT_DATA) and not Path(self.data).is_dir():
            raise ConfigError(
                f"data folder {self.data} does not exist (synthetic data is generated only at the default "
                f"{DEFAULT_DATA}): pass a folder with train.jsonl and val.jsonl"
            )
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        check_model(self.model)
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
        out |= {JUDGE_PREFIX + k: v for k, v in dataclasses.asdict(self.judge_config).items()}
        return out


# Presets: overrides of the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The tiny InternVL on 2 CPU cores: after the warm start (4-9 minutes), 2.5-8 minutes of GRPO and its evaluations; a
    # high learning rate and short completions suit a ~1.1 M-parameter model whose replies are one or two sentences.
    "tiny": {
        "name": "grpo-tiny",
        # Tuned on the warm starts (val reward of greedy replies, 200 items; see README "Training"): lr 1e-4 moved
        # the policy within ~50 steps where 5e-5 needed ~100 and 2e-4 stalled or swung between "always ask" and
        # "always answer"; sampling at temperature 0.7 beat 1.0; a KL anchor (beta 0.04) held it steadier; longer
        # runs drifted towards asking with wrong facts at one thread; on two threads (auto on an idle 2-core
        # machine) 300 steps beat 150 on every one of seeds 0-2 (mean lift +0.160 against +0.092), and at one thread
        # 450 beat 300 on every one of them (+0.195 against +0.148, with fewer factual errors) while 600 was level
        # with 450 (+0.200) for another minute of training; 16 prompts per step (batch 64) beat 8 on the warm starts
        # of seeds 0-5 with fewer misses of the per-seed bars, for ~2 more minutes; a fixed vision tower (the warm
        # start's) beat a trained one on each of seeds 0-2 (mean lift +0.220 against +0.192); leaving the groups of
        # equal rewards (25-70% of a step's) out of the loss lifted more on the mean of seeds 0-2 and of seeds 3-5
        # (+0.275 against +0.247 over the six), with two misses of the per-seed bars against five, and made GRPO
        # steps ~25% cheaper (docs/experiments.md).
        "freeze_vision_tower": True,
        "mask_zero_std_groups": True,
        "max_steps": 450,
        "num_generations": 4,
        "batch_size": 64,
        "max_completion_length": 40,
        "temperature": 0.7,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 5,
        "beta": 0.04,
        "use_bias_correction_kl": False,  # tuned with the plain k3 KL gradient, before TRL's default became True
        "save_steps": 50,
        "eval_steps": 50,
        "eval_items": 0,
    },
    # docs/design.md "Reference settings": a 2B VLM from an SFT checkpoint, LoRA r=8, 5e-6 cosine, G=2, batch 4 per
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
        "use_bias_correction_kl": False,  # the plain k3 KL of the settings above
        "bf16": True,
        "gradient_checkpointing": True,
        "max_steps": 1000,
        "save_steps": 100,
        "eval_steps": 100,
        "eval_items": 200,
        "eval_batch_size": 16,
    },
}


@dataclass(frozen=True)
class Setting:
    """One settable key of a settings dataclass: its real type, default, help and help section."""

    key: str  # the flat name: a field's, or <prefix><field> inside a nested settings dataclass
    kind: Any  # the resolved annotation (typing.get_type_hints): bool, int, float, str, a Literal, X | None
    default: Any
    help: str
    section: str


def settings(schema: type, prefix: str = "", section: str = "") -> dict[str, Setting]:
    """Every settable key of the dataclass `schema` -> its Setting, in field order. A field whose type is itself a
    dataclass is flattened: its fields become `<its "prefix" metadata><name>` in its section."""
    hints = typing.get_type_hints(schema)
    out: dict[str, Setting] = {}
    for f in dataclasses.fields(schema):
        where = f.metadata.get("section", section)
        if dataclasses.is_dataclass(hints[f.name]):
            out |= settings(hints[f.name], prefix + f.metadata["prefix"], where)
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        key = prefix + f.name
        out[key] = Setting(key, hints[f.name], default, f.metadata.get("help", ""), where)
    return out


def convert(kind: Any, value: Any, key: str) -> Any:
    """`value` (a YAML value or a command-line string) as type `kind` (bool, int, float, str, a Literal's str, each
    optionally `| None`, which reads "none", "null" or ""); ConfigError naming `key` when impossible."""
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
    if typing.get_origin(base) is Literal:
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


def check_model(model: str) -> None:
    """ConfigError unless `model` is a preset name, an existing folder or a hub id ("org/name")."""
    if (
        model not in MODEL_PRESETS
        and not Path(model).exists()
        and (model.startswith(("/", ".", "~")) or model.count("/") != 1)
    ):
        raise ConfigError(f"model {model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing folder")


def split_judge(values: dict[str, Any]) -> tuple[dict[str, Any], LLMJudgeConfig]:
    """Flat settings -> (the other keys, the LLMJudgeConfig of the judge_<field> keys); ConfigError from its checks."""
    judge = {k.removeprefix(JUDGE_PREFIX): v for k, v in values.items() if k.startswith(JUDGE_PREFIX)}
    rest = {k: v for k, v in values.items() if not k.startswith(JUDGE_PREFIX)}
    try:
        return rest, LLMJudgeConfig(**judge)
    except ValueError as e:  # LLMJudgeConfig's own checks
        raise ConfigError(str(e)) from None


def coerce(key: str, value: Any) -> Any:
    """`value` converted to the type of GRPOConfig key `key` (judge settings as judge_<field>); ConfigError when
    impossible or the key is unknown."""
    known = settings(GRPOConfig)
    if key not in known:
        raise ConfigError(f"unknown config key {key!r} (see --help for the list)")
    return convert(known[key].kind, value, key)


def read_config_file(config_file: str | Path) -> dict[str, Any]:
    """The key: value mapping of a YAML config file (kebab-case keys as snake_case), not yet converted; ConfigError
    when it is missing or not such a mapping."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def build_config(overrides: dict[str, Any], config_file: str | Path | None = None) -> GRPOConfig:
    """Dataclass defaults < preset < `config_file` (YAML mapping) < `overrides`; validated."""
    layers = [read_config_file(config_file)] if config_file is not None else []
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
    values, judge_config = split_judge(values)
    cfg = GRPOConfig(**values, judge_config=judge_config)
    cfg.validate()
    return cfg


def save_yaml(cfg: GRPOConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
