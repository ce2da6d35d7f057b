"""`python -m grpo_fast.train` configuration: presets, YAML and flags, --help, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest
import yaml

from grpo_fast.config import PRESETS, GRPOConfig, build_config, save_yaml, settings
from grpo_fast.train import main, parse_args, resume_changes


def test_defaults_are_trl_names_and_values_and_the_tiny_preset_applies():
    raw = GRPOConfig()
    assert (raw.beta, raw.epsilon, raw.epsilon_high, raw.delta, raw.loss_type) == (0.0, 0.2, None, None, "dapo")
    assert (raw.importance_sampling_level, raw.scale_rewards, raw.num_iterations) == ("token", "group", 1)
    assert (raw.num_generations, raw.temperature, raw.top_p, raw.learning_rate) == (8, 1.0, 1.0, 1e-6)
    cfg = build_config({})
    assert cfg.preset == "tiny" and cfg.num_generations == PRESETS["tiny"]["num_generations"]
    ref = build_config({"preset": "reference"})
    assert (ref.lora, ref.learning_rate, ref.num_generations, ref.batch_size) == (8, 5e-6, 2, 4)
    assert (ref.gradient_accumulation_steps, ref.max_prompt_length, ref.max_completion_length) == (2, 250, 200)
    assert (ref.beta, ref.bf16, ref.lr_scheduler_type) == (0.01, True, "cosine")
    assert build_config({"preset": "none"}).num_generations == 8


def test_yaml_under_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"learning-rate": 3e-4, "beta": 0.02, "judge_timeout_s": 5, "epsilon_high": 0.28}))
    cfg = parse_args(["--config", str(path), "--beta", "0.05", "--top_k", "20", "--overwrite", "--warm-start", "no"])
    assert (cfg.learning_rate, cfg.beta, cfg.top_k, cfg.epsilon_high) == (3e-4, 0.05, 20, 0.28)
    assert (cfg.overwrite, cfg.warm_start, cfg.judge_config.timeout_s) == (True, False, 5.0)
    assert parse_args(["--epsilon-high", "none"]).epsilon_high is None


def test_help_lists_every_field():
    out = subprocess.run(
        [sys.executable, "-m", "grpo_fast.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for key in settings(GRPOConfig):
        assert f"--{key.replace('_', '-')}" in out, key
    flat = " ".join(out.split())  # help text is wrapped to the terminal width
    assert "KL coefficient against the reference policy" in flat and "[default: 1.0; tiny preset: 0.7]" in flat
    assert "--loss-type {grpo,bnpo,dapo,dr_grpo,cispo,sapo,luspo,vespo}" in flat and "seconds one request may take [default: 60.0]" in flat


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--learning-rate", "-1"], "learning_rate must be > 0"),
        (["--learning-rate", "fast"], "learning_rate must be float"),
        (["--num-generations", "1"], "num_generations must be >= 2"),
        (["--batch-size", "10"], "batch_size (10) must be a positive multiple of num_generations (4)"),
        (["--loss-type", "ppo"], "argument --loss-type/--loss_type: invalid choice: 'ppo'"),
        (["--resume", "maybe"], "resume must be bool, got 'maybe'"),
        (["--sft-vision-steps", "-1"], "sft_vision_steps must be >= 0 or None"),
        (["--model", "{tmp}/missing-model"], "is neither a preset (tiny) nor an existing folder"),
        (["--config", "{tmp}/bad.yaml"], "unknown config key 'learning_rat'"),
        (["--config", "{tmp}/nope.yaml"], "does not exist"),
        (["--config", "{tmp}/ppo.yaml"],
         "loss_type must be one of grpo, bnpo, dapo, dr_grpo, cispo, sapo, luspo, vespo; got 'ppo'"),
        (["--top-entropy-quantile", "0"], "top_entropy_quantile must be in (0, 1], got 0.0"),
        (["--top-entropy-quantile", "1.5"], "top_entropy_quantile must be in (0, 1], got 1.5"),
        (["--entropy-coef", "-0.1"], "entropy_coef must be >= 0, got -0.1"),
        (["--entropy-coef-delta", "-1"], "entropy_coef_delta must be >= 0"),
        (["--vespo-lambda-neg", "-2"], "vespo_lambda_neg must be >= 0"),
        (["--sapo-temperature-neg", "0"], "sapo_temperature_neg must be > 0"),
        (["--off-policy-mask-threshold", "-0.5"], "off_policy_mask_threshold must be >= 0 or None"),
        (["--entropy-coef-min", "0.5", "--entropy-coef-max", "0.1"],
         "entropy_coef_min (0.5) must be <= entropy_coef_max"),
        (["--multi-objective-aggregation", "mean"], "invalid choice: 'mean'"),
        (["--judge", "llm"], "--judge llm needs the judge model's name"),
        (["--report-to", "neptune"], "invalid choice: 'neptune'"),
        (["--fsdp"], "--fsdp shards the model across processes: launch with torchrun"),
        (["--fsdp", "--lora", "4"], "--fsdp shards full fine-tuning only"),
        (["--name", "taken"], "holds another run: pass --overwrite"),
        (["--name", "fresh", "--resume"], "fresh does not exist: check --name and --output-dir"),
        (["--name", "died", "--resume"], "never reached a checkpoint: pass --overwrite instead of --resume"),
        (["--name", "died"], "holds a run that never reached a checkpoint: pass --overwrite to start it again"),
        (["--resume", "--overwrite"], "--resume continues the run and --overwrite replaces it: pass one of them"),
        (["--data", "{tmp}/mistyped", "--name", "x"], "mistyped does not exist (synthetic data is generated only at"),
        (["--data", "{tmp}/empty-data", "--name", "x"], "has no train.jsonl"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    (tmp_path / "ppo.yaml").write_text("loss_type: ppo\n")
    (tmp_path / "runs/taken/checkpoints/step-000001").mkdir(parents=True)
    (tmp_path / "runs/taken/config.yaml").write_text("{}")
    (tmp_path / "runs/died").mkdir()
    (tmp_path / "runs/died/metrics.jsonl").write_text("")
    (tmp_path / "empty-data").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in args] + ["--output-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert (tmp_path / "runs/taken/config.yaml").read_text() == "{}"  # nothing overwritten


def test_resume_layers_the_new_flags_over_the_saved_config(tmp_path):
    runs = str(tmp_path / "runs")
    first = ["--output-dir", runs, "--name", "r", "--learning-rate", "3e-4", "--max-steps", "2", "--overwrite"]
    (tmp_path / "runs/r").mkdir(parents=True)
    save_yaml(parse_args([*first, "--judge-base-url", "http://a/v1"]), tmp_path / "runs/r/config.yaml")
    again = ["--output-dir", runs, "--name", "r", "--resume"]
    cfg = parse_args([*again, "--max-steps", "8", "--judge-base-url", "http://b/v1"])
    # the saved learning rate stays, the new flags win, and the saved --overwrite is not taken over
    assert (cfg.max_steps, cfg.judge_config.base_url, cfg.learning_rate) == (8, "http://b/v1", 3e-4)
    assert not cfg.overwrite
    assert resume_changes(cfg) == ["max_steps: 2 -> 8", "judge_base_url: 'http://a/v1' -> 'http://b/v1'"]
    # a --config file sits between the saved config and the flags
    (tmp_path / "more.yaml").write_text("learning_rate: 1.0e-5\nmax_steps: 5\n")
    cfg = parse_args([*again, "--config", str(tmp_path / "more.yaml"), "--max-steps", "9"])
    assert (cfg.learning_rate, cfg.max_steps, cfg.judge_config.base_url) == (1e-5, 9, "http://a/v1")
