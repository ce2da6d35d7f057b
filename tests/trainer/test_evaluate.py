"""`python -m grpo_fast.evaluate`: a run's final/ model gets the run's last evaluation; files, table; bad input."""

import json
import math

import pytest

from grpo_fast.config import ConfigError
from grpo_fast.data import load_seed
from grpo_fast.evaluate import check_fields, main
from grpo_fast.rewards import RuleJudge
from grpo_fast.rewards.llm_judge import LLMJudge, LLMJudgeConfig
from grpo_fast.train import main as train


def test_a_runs_final_model_gets_the_numbers_of_its_last_evaluation(
    tmp_path, synthetic_data, tiny_run_flags, stub_judge, capsys
):
    # the stub judge's hashed verdicts give a random model's completions varied rewards; lr 1e-2 moves the model in
    # 2 steps far enough to change its greedy completions, so the numbers depend on the weights evaluated
    runs, data = tmp_path / "runs", ["--data", str(synthetic_data)]
    short = ["--warm-start", "false", "--max-steps", "2", "--save-steps", "2", "--learning-rate", "1e-2"]
    train([*tiny_run_flags, *stub_judge.flags, *data, "--output-dir", str(runs), *short])
    logged = [json.loads(line) for line in (runs / "grpo-tiny/metrics.jsonl").read_text().splitlines()]
    before, after = [r for r in logged if "eval/reward" in r]
    assert before["eval/reward"] != after["eval/reward"]
    capsys.readouterr()
    # --max-items 4 as the run's --eval-items 4; max_new_tokens from the run's config.yaml (8); one thread as the run
    out = tmp_path / "eval"
    main(
        ["--model", str(runs / "grpo-tiny/final"), *stub_judge.flags, *data, "--max-items", "4", "--out", str(out)]
        + ["--torch-threads", "1"]
    )
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["decoding"] == {"mode": "greedy", "max_new_tokens": 8}
    assert (result["split"], result["judge"]["kind"], result["items"], result["completions"]) == ("val", "llm", 4, 4)
    for key, value in result["metrics"].items():  # NaN (nothing scored) is null in eval.json
        assert value == after[key] or (value is None and math.isnan(after[key])), key
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and samples[0].keys() >= {"question", "level", "completion", "strategy", "reward", "image"}
    overall = result["levels"]["overall"]
    assert overall["reward"] == result["metrics"]["eval/reward"] and overall["items"] == 4
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == ["| level", "| ambig", "| unambig", "| overall"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{data}"], "--model is required"),
        (["--model", "{tmp}/missing-model"], "model '{tmp}/missing-model' is neither a preset (tiny) nor an existing"),
        (["--model", "tiny", "--data", "{tmp}/nothing"], "data folder {tmp}/nothing does not exist"),
        (["--model", "tiny", "--split", "test"], "has no split 'test' (test.jsonl); its splits: train, val"),
        (["--model", "tiny", "--data", "{tmp}/plain"], "val.jsonl: item 1 lacks scene, target, which the rule judge"),
        (["--model", "tiny", "--judge", "llm"], "the LLM judge needs a model name: pass --judge-model NAME"),
        (["--model", "tiny", "--num-samples", "-1"], "num_samples must be >= 0"),
        (["--model", "tiny", "--judge", "gpt"], "argument --judge: invalid choice: 'gpt'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, synthetic_data, capsys, args, message):
    (tmp_path / "plain").mkdir()  # seed-format items without the synthetic ground truth
    plain = [
        {k: v for k, v in it.items() if k not in ("scene", "target")} for it in load_seed(synthetic_data / "val.jsonl")
    ]
    (tmp_path / "plain/val.jsonl").write_text("".join(json.dumps(it) + "\n" for it in plain))
    data = ["--data", str(synthetic_data)] if "--data" not in args else []
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path, data=synthetic_data) for a in args] + data + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing generated, nothing written


def test_the_llm_judge_needs_image_question_and_level(monkeypatch, few_items):
    monkeypatch.setenv("STUB_KEY", "unused")
    judge = LLMJudge(LLMJudgeConfig(model="stub", api_key_env="STUB_KEY", base_url="http://127.0.0.1:9/v1"))
    check_fields(few_items, judge, "llm", "val.jsonl")  # the synthetic items have all three
    bare = [{**it, "image": None} for it in few_items]
    with pytest.raises(ConfigError, match=r"^val.jsonl: item 1 lacks image, which the llm judge needs$"):
        check_fields(bare, judge, "llm", "val.jsonl")
    judge.close()
    check_fields(bare, RuleJudge(), "rule", "val.jsonl")  # the rule judge reads the ground truth, not the image
