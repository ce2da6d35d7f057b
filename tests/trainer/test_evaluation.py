"""Evaluation: the metrics of judged completions by hand (overall and per level), the tables, and greedy and seeded
sampled evaluations of the tiny model."""

import math

import pytest
import torch

from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.rewards import Judgment, RuleJudge, rubric_reward
from grpo_fast.trainer.evaluation import (
    Sampling,
    completion_texts,
    eval_metrics,
    evaluate,
    format_levels,
    format_table,
    level_summary,
)

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


def test_levels_by_hand_count_items_once_per_sample_and_print_a_row_each():
    # 2 samples per item: an ambig item (scores 4 PASS, 1 FAIL) and an unambig one (4 PASS, unscorable)
    levels = ["ambig", "ambig", "unambig", "unambig"]
    judged = [Judgment(4, True), Judgment(1, False), Judgment(4, True), None]
    rows = level_summary(levels, judged, samples_per_item=2)
    assert rows["ambig"] == {"items": 1, "strategy_acc": 0.5, "factual_pass": 0.5, "reward": 0.5, "unscorable": 0}
    assert rows["unambig"] == {"items": 1, "strategy_acc": 1.0, "factual_pass": 1.0, "reward": 1.0, "unscorable": 1}
    # overall: rewards 1.0, 0.0 (0.0 - 0.3, floored), 1.0 -> 2/3; right strategy on 2 of the 3 scored
    assert rows["overall"]["reward"] == pytest.approx(2 / 3) and rows["overall"]["strategy_acc"] == pytest.approx(2 / 3)
    assert eval_metrics(levels, judged, samples_per_item=2)["eval/items"] == 2.0
    lines = format_levels(level_summary(["ambig"], [None])).splitlines()
    assert lines[0] == "| level | items | strategy accuracy | factual pass | mean reward | unscorable |"
    assert lines[2] == "| ambig | 1 | - | - | - | 1 |"  # nothing scored: no rates
    assert lines[3] == "| unambig | 0 | - | - | - | 0 |" and lines[4].startswith("| overall | 1 |")


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
    texts = completion_texts(tiny_policy, items, batch_size=3, max_new_tokens=4)
    assert model.training  # generation ran in eval mode, and the mode is put back
    model.train(mode)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    result = evaluate(tiny_policy, items, RuleJudge(), CPU, batch_size=2, max_new_tokens=4)
    judged = RuleJudge().judge(items, texts)
    assert result.metrics == eval_metrics([it["level"] for it in items], judged)
    assert [r["completion"] for r in result.records] == texts
    first = result.records[0]
    assert (first["item"], first["sample"], first["question"], first["image"]) == (
        0,
        0,
        items[0]["question"],
        items[0]["image"],
    )
    assert (first["strategy"], first["factual_pass"]) == (judged[0].strategy, judged[0].factual_pass)
    assert first["reward"] == rubric_reward(judged[0])


def test_sampled_evaluation_is_seeded_per_completion(tiny_policy, synthetic_data):
    items = load_seed(synthetic_data / "val.jsonl")[:2]
    sampling = Sampling(num_samples=3, temperature=1.0, seed=5)

    def run(batch: int):
        return evaluate(tiny_policy, items, RuleJudge(), CPU, batch_size=batch, max_new_tokens=4, sampling=sampling)

    result = run(6)
    assert [(r["item"], r["sample"]) for r in result.records] == [(i, s) for i in range(2) for s in range(3)]
    assert result.metrics["eval/items"] == 2.0 and result.levels["overall"]["items"] == 2.0
    texts = [r["completion"] for r in result.records]
    assert len(set(texts)) > 1  # the samples of an item differ from one another
    assert [r["completion"] for r in run(4).records] == texts  # a completion depends on its seed, not its batch
