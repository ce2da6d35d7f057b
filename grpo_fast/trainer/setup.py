"""What a run needs before its first step: the data, the SFT warm start, the policy (LoRA, attention, Liger,
gradient checkpointing, FSDP2), the frozen reference model and the judge."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from grpo_fast.config import DEFAULT_DATA, MODEL_PRESETS, ConfigError, GRPOConfig, JudgeKind
from grpo_fast.data.splits import load_splits
from grpo_fast.data.synthetic import write_dataset
from grpo_fast.distributed import DistEnv, barrier, shard
from grpo_fast.models.policy import Policy, load_policy
from grpo_fast.rewards.judge import Judge
from grpo_fast.rewards.llm_judge import LLMJudge, LLMJudgeConfig
from grpo_fast.rewards.rule_judge import RuleJudge
from grpo_fast.sft import SFTConfig
from grpo_fast.sft import train as train_sft
from grpo_fast.trainer.precision import has_flash_attn, resolve_precision

# Projections LoRA adapts: attention and MLP of Qwen2/Llama-style decoders (docs/design.md, "Reference settings").
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_data(cfg: GRPOConfig, env: DistEnv) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val) items; generates the synthetic data first when the data folder is the default and does not
    exist (another folder must exist: GRPOConfig.validate)."""
    folder = Path(cfg.data)
    if not folder.exists() and folder == Path(DEFAULT_DATA):
        if env.is_main:
            print(f"generating {cfg.synthetic_items} synthetic items in {folder}")
            write_dataset(folder, cfg.synthetic_items, cfg.seed)
        barrier(env)
    return load_splits(folder, skip_bad_lines=cfg.skip_bad_lines)


def warm_start_dir(cfg: GRPOConfig) -> Path:
    return Path(cfg.warm_start_dir) if cfg.warm_start_dir else Path(cfg.output_dir) / "warm-start"


def warm_start(cfg: GRPOConfig, env: DistEnv) -> str:
    """The model GRPO starts from: `cfg.model` itself, or for a preset an SFT warm start (reused when a previous
    run wrote one with identical settings)."""
    if cfg.model not in MODEL_PRESETS or not cfg.warm_start:
        return cfg.model
    out = warm_start_dir(cfg)
    overrides = {"steps": cfg.sft_steps, "vision_steps": cfg.sft_vision_steps}  # None: grpo_fast.sft's default
    sft_cfg = SFTConfig(
        data=cfg.data,
        skip_bad_lines=cfg.skip_bad_lines,
        model=cfg.model,
        seed=cfg.seed,
        threads=cfg.torch_threads,
        out=str(out),
        **{k: v for k, v in overrides.items() if v is not None},
    )
    saved = out / "checkpoint" / "sft_config.json"
    if saved.is_file() and json.loads(saved.read_text()) == dataclasses.asdict(sft_cfg):
        if env.is_main:
            print(f"warm start: reusing {out / 'checkpoint'}")
    elif env.is_main:
        print(f"warm start: SFT for {sft_cfg.steps} steps into {out}")
        print("warm start:", json.dumps(train_sft(sft_cfg)))
    barrier(env)
    return str(out / "checkpoint")


def _apply_lora(model: torch.nn.Module, cfg: GRPOConfig) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--lora needs peft: pip install 'grpo_fast[lora]' (or pip install peft)") from None
    config = LoraConfig(r=cfg.lora, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def _apply_liger(model: torch.nn.Module, env: DistEnv) -> None:
    if env.device.type != "cuda":
        print("use_liger: Liger's model patches are Triton kernels for CUDA; skipped on CPU")
        return
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ConfigError("--use-liger needs liger-kernel: pip install 'grpo_fast[gpu]'") from None
    # The fused linear cross-entropy patch is for SFT losses; GRPO computes its own loss from the hidden states.
    _apply_liger_kernel_to_instance(
        model=model.get_base_model() if hasattr(model, "get_base_model") else model,
        fused_linear_cross_entropy=False,
        cross_entropy=False,
    )


def build_policy(cfg: GRPOConfig, source: str, env: DistEnv) -> tuple[Policy, torch.nn.Module | None]:
    """The trainable policy on `env.device` and, when `beta > 0` without LoRA, a frozen copy as reference
    (with LoRA the reference is the same model with its adapters disabled: None is returned)."""
    try:
        policy = load_policy(source, seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = policy.model
    precision = resolve_precision(env.device.type, cfg.bf16, has_flash_attn(), cfg.attn_implementation,
                                  cfg.cast_lm_head_to_fp32)
    model.set_attn_implementation(precision.attn_implementation)
    if cfg.use_liger:
        _apply_liger(model, env)
    ref = None
    if cfg.beta > 0 and not cfg.lora:
        ref = copy.deepcopy(model).eval().requires_grad_(False).to(env.device)
    if cfg.lora:
        model = _apply_lora(model, cfg)
    if cfg.freeze_vision_tower:
        model.get_encoder(modality="image").requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            model.enable_input_require_grads()
    model.to(env.device).train()
    if cfg.fsdp:
        for m in (model, ref) if ref is not None else (model,):
            shard(m)
    policy.model = model
    return policy, ref


def build_judge(kind: JudgeKind, config: LLMJudgeConfig) -> Judge:
    """The rule judge, or the LLM judge with `config`; ConfigError on bad settings (no model name, no API key)."""
    if kind == "rule":
        return RuleJudge()
    try:
        return LLMJudge(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
