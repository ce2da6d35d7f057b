"""The run configuration: a leaf module, choices declared once as Literal aliases, flattened settings, coercion."""

import subprocess
import sys
import typing

import pytest

from grpo_fast.config import (
    JUDGE_PREFIX,
    ConfigError,
    GRPOConfig,
    LossType,
    build_config,
    choices,
    coerce,
    settings,
)


def test_importing_the_config_loads_no_heavy_or_model_module():
    code = "import sys, grpo_fast.config; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "grpo_fast.config" in loaded
    for name in ("torch", "transformers", "openai", "grpo_fast.models", "grpo_fast._tiling", "grpo_fast.rewards"):
        assert name not in loaded, name


def test_choices_come_from_the_literal_aliases_and_every_default_is_one():
    assert choices(LossType) == ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")
    literal = {k: s for k, s in settings(GRPOConfig).items() if typing.get_origin(s.kind) is typing.Literal}
    assert {"loss_type", "importance_sampling_level", "scale_rewards", "lr_scheduler_type", "judge"} <= set(literal)
    assert {"report_to", "attn_implementation", "judge_api", "multi_objective_aggregation"} <= set(literal)
    assert all(s.default in choices(s.kind) for s in literal.values())
    with pytest.raises(ConfigError, match="importance_sampling_level must be one of token, sequence; got 'seq'"):
        build_config({"importance_sampling_level": "seq"})


def test_settings_flatten_the_judge_fields_into_their_section():
    known = settings(GRPOConfig)
    judge = {k: s for k, s in known.items() if k.startswith(JUDGE_PREFIX)}
    assert "judge_config" not in known and "judge" in known and len(judge) == 13
    assert all(s.section == "judge" and s.help for s in judge.values())
    assert known["judge_timeout_s"].default == 60.0 and known["beta"].section == "loss"
    assert list(known) == list(GRPOConfig().to_dict())  # the flat keys are config.yaml's, in the same order


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("resume", "yes", True),
        ("resume", "0", False),
        ("epsilon_high", "none", None),
        ("epsilon_high", "0.28", 0.28),
        ("max_steps", 3.0, 3),
        ("judge_temperature", "null", None),
        ("loss_type", "grpo", "grpo"),
    ],
)
def test_coerce_converts_to_the_field_type(key, value, expected):
    assert coerce(key, value) == expected


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_steps", 2.5, "max_steps must be int, got 2.5"),
        ("resume", "maybe", "resume must be bool"),
        ("beta", None, "beta cannot be empty"),
        ("n", 10, "unknown config key 'n'"),
    ],
)
def test_coerce_names_the_key_and_the_fix(key, value, message):
    with pytest.raises(ConfigError, match=message):
        coerce(key, value)


def test_synthetic_items_must_be_positive():
    assert build_config({"synthetic_items": 24}).synthetic_items == 24
    with pytest.raises(ConfigError, match="synthetic_items must be >= 1, got 0"):
        build_config({"synthetic_items": 0})
