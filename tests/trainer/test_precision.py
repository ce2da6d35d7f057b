"""The run's dtype policy: the decision table of `resolve_precision`, and every path of the trainer following it
(generation, the log-prob passes, the loss forward and its lm_head GEMMs, evaluation)."""

import itertools

import pytest
import torch

from grpo_fast.config import AttnImplementation, ConfigError, build_config, choices
from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.models import load_policy
from grpo_fast.rewards import RuleJudge
from grpo_fast.trainer import loop
from grpo_fast.trainer.precision import Precision, resolve_precision
from grpo_fast.trainer.run_dir import prepare_run_dir

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "device, bf16, flash, attn, cast, expected",
    [
        # CPU: --bf16 is ignored, everything fp32; auto is sdpa even with flash-attn installed
        ("cpu", False, False, "auto", False, ("sdpa", None, FP32, FP32)),
        ("cpu", True, True, "auto", False, ("sdpa", None, FP32, FP32)),
        # CUDA without --bf16: an fp32 forward, so never flash_attention_2
        ("cuda", False, True, "auto", False, ("sdpa", None, FP32, FP32)),
        # CUDA with --bf16: bf16 autocast for every forward, generation included; bf16 lm_head GEMMs
        ("cuda", True, True, "auto", False, ("flash_attention_2", BF16, BF16, BF16)),
        ("cuda", True, False, "auto", False, ("sdpa", BF16, BF16, BF16)),
        ("cuda", True, True, "flash_attention_2", False, ("flash_attention_2", BF16, BF16, BF16)),
        ("cuda", True, True, "eager", False, ("eager", BF16, BF16, BF16)),
        # cast_lm_head_to_fp32 (TRL's): fp32 logits under bf16 autocast; nothing to cast without it
        ("cuda", True, True, "auto", True, ("flash_attention_2", BF16, BF16, FP32)),
        ("cuda", False, False, "sdpa", True, ("sdpa", None, FP32, FP32)),
    ],
)
def test_decision_table(device, bf16, flash, attn, cast, expected):
    p = resolve_precision(device, bf16, flash, attn, cast)
    assert (p.attn_implementation, p.autocast_dtype, p.generation_dtype, p.lm_head_dtype) == expected


@pytest.mark.parametrize("device, bf16, flash, match", [
    ("cuda", False, True, "needs bf16 forwards"),  # fp32 on CUDA: flash-attn would reject it
    ("cpu", True, True, "needs bf16 forwards"),  # --bf16 does nothing on CPU
    ("cuda", True, False, "pip install flash-attn"),
])
def test_flash_attention_where_it_cannot_run_is_a_config_error(device, bf16, flash, match):
    with pytest.raises(ConfigError, match=match):
        resolve_precision(device, bf16, flash, "flash_attention_2", False)


def test_flash_attention_is_never_chosen_for_an_fp32_forward():
    for device, bf16, flash, attn, cast in itertools.product(("cpu", "cuda"), (False, True), (False, True),
                                                              choices(AttnImplementation), (False, True)):
        try:
            p = resolve_precision(device, bf16, flash, attn, cast)
        except ConfigError:
            continue
        if p.attn_implementation == "flash_attention_2":
            assert p.autocast_dtype == p.generation_dtype == BF16 and flash


def test_every_trainer_path_follows_the_policy(monkeypatch, synthetic_data, tmp_path):
    # CPU bf16 autocast stands in for CUDA's: the policy (forced here) says bf16 forwards, fp32 lm_head GEMMs
    forced = Precision("sdpa", BF16, BF16, FP32)
    monkeypatch.setattr(loop, "resolve_precision", lambda *args: forced)
    seen = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, torch.is_autocast_enabled("cpu"), kwargs.get("compute_dtype")))
            return fn(*args, **kwargs)

        monkeypatch.setattr(loop, name, wrapped)

    for name in ("generate_completions", "completion_hidden", "fused_linear_logprobs", "fused_linear_grpo_loss",
                 "evaluate"):
        spy(name, getattr(loop, name))
    cfg = build_config({"batch_size": 4, "num_generations": 2, "max_completion_length": 6, "beta": 0.0,
                        "num_iterations": 2, "max_steps": 1, "eval_items": 2, "save_steps": 1, "warm_start": False,
                        "output_dir": str(tmp_path), "name": "precision"})
    items = load_seed(synthetic_data / "train.jsonl")
    lock = prepare_run_dir(cfg)
    try:
        loop.run(cfg, DistEnv(0, 1, torch.device("cpu")), load_policy("tiny", seed=0), None, RuleJudge(), items,
                 items[:2])
    finally:
        lock.release()
    assert {name for name, _, _ in seen} == {"generate_completions", "completion_hidden", "fused_linear_logprobs",
                                             "fused_linear_grpo_loss", "evaluate"}
    for name, autocast, compute_dtype in seen:
        if name in ("fused_linear_logprobs", "fused_linear_grpo_loss"):
            assert compute_dtype == FP32, name  # the lm_head GEMMs run outside autocast, in the policy's dtype
        else:
            assert autocast, f"{name} ran outside the bf16 autocast region"
