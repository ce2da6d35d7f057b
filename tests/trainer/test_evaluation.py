"""Greedy evaluation: the metrics of judged completions by hand, the before/after table, and a run on the tiny model."""

import math

import pytest
import torch

from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.rewards import Judgment, RuleJudge, rubric_reward
from grpo_fast.trainer.evaluation import eval_metrics, evaluate, format_table, greedy_completions

CPU = DistEnv(0, 1, torch.device("cpu"))


def test_metrics_by_hand_leave_unscorable_items_out():
    levels = ["ambig", "ambig", "unambig", "unambig"]
    judged = [Judgment(4, True), Judgment(2, False), Judgment(3, True), None]
    metrics = eval_metrics(levels, judged)
    assert metrics["eval/reward"] == pytest.approx(sum(rubric_reward(j) for j in judged[:3]) / 3)
    assert metrics["eval/strategy_acc_ambig"] == 0.5  # scores 4 and 2: one right strategy
    assert metrics["eval/strategy_acc_unambig"] == 1.0  # the unscorable item is not counted
    assert metrics["eval/factual_pass"] == pytest.approx(2 / 3)
    assert (metrics["eval/items"], metrics["eval/unscorable"]) == (4.0, 1.0)
    assert math.isnan(eval_metrics(["ambig"], [Judgment(4, True)])["eval/strategy_acc_unambig"])


def test_the_table_has_one_line_per_metric_with_the_change():
    before = {"eval/reward": 0.25, "eval/strategy_acc_ambig": 0.5, "eval/strategy_acc_unambig": 1.0}
    after = {"eval/reward": 0.5, "eval/strategy_acc_ambig": 0.25, "eval/strategy_acc_unambig": 1.0}
    before["eval/factual_pass"] = after["eval/factual_pass"] = 0.75
    lines = format_table(before, after).splitlines()
    assert lines[0].split() == ["val", "split", "(greedy)", "before", "after", "change"]
    assert lines[1].split() == ["mean", "reward", "0.250", "0.500", "+0.250"]
    assert lines[2].endswith("-0.250") and lines[4].endswith("+0.000") and len(lines) == 5


def test_evaluate_judges_one_greedy_completion_per_item(tiny_policy, synthetic_data):
    items = load_seed(synthetic_data / "val.jsonl")
    model, mode = tiny_policy.model, tiny_policy.model.training
    model.train()
    texts = greedy_completions(tiny_policy, items, batch_size=3, max_new_tokens=4)
    assert model.training  # generation ran in eval mode, and the mode is put back
    model.train(mode)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    metrics = evaluate(tiny_policy, items, RuleJudge(), CPU, batch_size=2, max_new_tokens=4)
    assert metrics == eval_metrics([it["level"] for it in items], RuleJudge().judge(items, texts))
