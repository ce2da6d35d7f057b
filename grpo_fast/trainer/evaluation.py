"""Greedy evaluation on the val split, and the before/after table.

Metrics (one greedy completion per item, judged by the run's judge):
- `eval/reward`: mean rubric reward (unscorable completions left out);
- `eval/strategy_acc_ambig`, `eval/strategy_acc_unambig`: share of items of that level whose strategy score is
  3 or 4, i.e. the right strategy (asked or listed the readings on an ambiguous question, answered an unambiguous
  one plainly);
- `eval/factual_pass`: share of completions whose every stated fact is in the image.
Items are split across ranks and the judgments gathered, so every rank runs its share of the generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpo_fast.distributed import DistEnv, all_gather_objects
from grpo_fast.models.generation import generate_completions
from grpo_fast.models.inputs import collate
from grpo_fast.models.policy import Policy
from grpo_fast.rewards.judge import Judge, Judgment, rubric_reward

# The before/after table's lines: metric key, label.
TABLE_METRICS = (
    ("eval/reward", "mean reward"),
    ("eval/strategy_acc_ambig", "strategy accuracy, ambig"),
    ("eval/strategy_acc_unambig", "strategy accuracy, unambig"),
    ("eval/factual_pass", "factual pass rate"),
)


def greedy_completions(
    policy: Policy, items: Sequence[dict[str, Any]], batch_size: int, max_new_tokens: int, synced: bool = False
) -> list[str]:
    """One greedy completion per item, decoded without special tokens."""
    model, tok = policy.model, policy.tokenizer
    was_training = model.training
    model.eval()
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = collate(policy, items[start : start + batch_size])
        out = generate_completions(model, batch, tok, max_new_tokens=max_new_tokens, synced=synced)
        texts += tok.batch_decode(out.ids, skip_special_tokens=True)
    model.train(was_training)
    return texts


def eval_metrics(levels: Sequence[str], judgments: Sequence[Judgment | None]) -> dict[str, float]:
    """The eval metrics of judged completions (see the module docstring); NaN where a level has no scored item."""
    scored = [(lv, j) for lv, j in zip(levels, judgments) if j is not None]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    out = {"eval/reward": mean([rubric_reward(j) for _, j in scored])}
    for level in ("ambig", "unambig"):
        out[f"eval/strategy_acc_{level}"] = mean([float(j.strategy >= 3) for lv, j in scored if lv == level])
    out["eval/factual_pass"] = mean([float(j.factual_pass) for _, j in scored])
    out["eval/items"] = float(len(levels))
    out["eval/unscorable"] = float(len(levels) - len(scored))
    return out


def evaluate(
    policy: Policy,
    items: Sequence[dict[str, Any]],
    judge: Judge,
    env: DistEnv,
    batch_size: int,
    max_new_tokens: int,
    synced: bool = False,
) -> dict[str, float]:
    """Greedy completions of `items` (sharded over ranks), judged; the same metrics on every rank. With `synced`
    (a sharded model) every rank runs the same generate calls: a short shard is padded with the first item, whose
    extra completions are dropped."""
    mine = list(items[env.rank :: env.world])
    real = len(mine)
    if synced:
        mine += list(items[:1]) * (-(-len(items) // env.world) - real)
    texts = greedy_completions(policy, mine, batch_size, max_new_tokens, synced)[:real] if mine else []
    mine = mine[:real]
    judged = list(zip([it["level"] for it in mine], judge.judge(mine, texts) if mine else []))
    everything = [pair for part in all_gather_objects(judged, env) for pair in part]
    return eval_metrics([lv for lv, _ in everything], [j for _, j in everything])


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A plain-text table: metric, warm start, after GRPO, change."""
    lines = [f"{'val split (greedy)':<28} {'before':>8} {'after':>8} {'change':>8}"]
    for key, label in TABLE_METRICS:
        b, a = before[key], after[key]
        lines.append(f"{label:<28} {b:8.3f} {a:8.3f} {a - b:+8.3f}")
    return "\n".join(lines)
