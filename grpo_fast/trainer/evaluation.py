"""Evaluation: a policy's completions of a split's items, judged; the metrics, per-item records and tables.

`evaluate` is the one evaluation: the trainer's before/after evaluation and `python -m grpo_fast.evaluate` both
call it, so their numbers agree by construction. Decoding is greedy, one completion per item, unless `Sampling`
asks for K sampled completions per item: sample k of item i is drawn by its own generator, seeded by
(seed, i, k) (`SeededSampler`, `row_seed`), so it does not depend on the batch size or the number of ranks.

Metrics, over completions judged by the run's judge (unscorable ones left out of the means):
- `eval/reward`: mean rubric reward;
- `eval/strategy_acc_ambig`, `eval/strategy_acc_unambig`: share of completions for items of that level whose
  strategy score is 3 or 4, i.e. the right strategy (asked or listed the readings on an ambiguous question,
  answered an unambiguous one plainly);
- `eval/factual_pass`: share of completions whose every stated fact is in the image;
- `eval/items`: items evaluated; `eval/unscorable`: completions the judge could not score.
`level_summary` gives the same measures per level and overall, `format_levels` prints them as a Markdown table.
Completions are split across ranks and the judgments gathered, so every rank runs its share of the generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grpo_fast.data.seed import LEVELS
from grpo_fast.distributed import DistEnv, all_gather_objects
from grpo_fast.models.generation import SeededSampler, generate_completions
from grpo_fast.models.inputs import collate
from grpo_fast.models.policy import Policy
from grpo_fast.rewards.judge import Judge, Judgment, rubric_reward
from grpo_fast.trainer.faults import crash_point
from grpo_fast.trainer.rollout import row_seed

# The before/after table's lines: metric key, label.
TABLE_METRICS = (
    ("eval/reward", "mean reward"),
    ("eval/strategy_acc_ambig", "strategy accuracy, ambig"),
    ("eval/strategy_acc_unambig", "strategy accuracy, unambig"),
    ("eval/factual_pass", "factual pass rate"),
)


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: `num_samples` completions per item, drawn at this temperature / top-k / top-p."""

    num_samples: int
    temperature: float = 1.0
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Evaluation:
    """What `evaluate` returns (the same on every rank)."""

    metrics: dict[str, float]  # the eval/* metrics (module docstring)
    levels: dict[str, dict[str, float]]  # `level_summary`: ambig, unambig, overall
    # one per completion, in item order (an item's samples together): item and sample index, question, level,
    # image, completion, strategy (1-4), factual_pass, reward (the last three None when unscorable)
    records: list[dict[str, Any]]


def completion_texts(
    policy: Policy,
    items: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    seeds: Sequence[int] = (),
    synced: bool = False,
) -> list[str]:
    """One completion per item, decoded without special tokens: greedy, or with `sampling` item i drawn by a
    generator seeded with `seeds[i]`. Generation runs in eval mode; the model's mode is put back."""
    model, tok = policy.model, policy.tokenizer
    was_training = model.training
    model.eval()
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = collate(policy, items[start : start + batch_size])
        sampler = None
        if sampling is not None:
            chunk = list(seeds[start : start + batch_size])
            sampler = SeededSampler(chunk, sampling.temperature, sampling.top_k, sampling.top_p)
        out = generate_completions(
            model, batch, tok, max_new_tokens=max_new_tokens, logits_processor=sampler, synced=synced
        )
        texts += tok.batch_decode(out.ids, skip_special_tokens=True)
    model.train(was_training)
    return texts


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def level_summary(
    levels: Sequence[str], judgments: Sequence[Judgment | None], samples_per_item: int = 1
) -> dict[str, dict[str, float]]:
    """Per level ("ambig", "unambig") and "overall": items, strategy_acc, factual_pass, reward (means over scored
    completions, NaN when there are none) and unscorable (completions); `levels[i]` is completion i's item's."""
    out = {}
    for name in (*LEVELS, "overall"):
        judged = [j for lv, j in zip(levels, judgments) if name in ("overall", lv)]
        scored = [j for j in judged if j is not None]
        out[name] = {
            "items": float(len(judged) // samples_per_item),
            "strategy_acc": _mean([float(j.strategy >= 3) for j in scored]),
            "factual_pass": _mean([float(j.factual_pass) for j in scored]),
            "reward": _mean([rubric_reward(j) for j in scored]),
            "unscorable": float(len(judged) - len(scored)),
        }
    return out


def eval_metrics(
    levels: Sequence[str], judgments: Sequence[Judgment | None], samples_per_item: int = 1
) -> dict[str, float]:
    """The eval/* metrics of judged completions (see the module docstring); NaN where a level has no scored one."""
    rows = level_summary(levels, judgments, samples_per_item)
    return {
        "eval/reward": rows["overall"]["reward"],
        "eval/strategy_acc_ambig": rows["ambig"]["strategy_acc"],
        "eval/strategy_acc_unambig": rows["unambig"]["strategy_acc"],
        "eval/factual_pass": rows["overall"]["factual_pass"],
        "eval/items": rows["overall"]["items"],
        "eval/unscorable": rows["overall"]["unscorable"],
    }


def evaluate(
    policy: Policy,
    items: Sequence[dict[str, Any]],
    judge: Judge,
    env: DistEnv,
    *,
    batch_size: int,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    synced: bool = False,
) -> Evaluation:
    """Completions of `items` (greedy, or `sampling.num_samples` each), sharded over ranks and judged. With `synced`
    (a sharded model) every rank runs the same generate calls: a short shard is padded with the first completion's
    item, whose extra completions are dropped."""
    k = sampling.num_samples if sampling is not None else 1
    rows = [(i, s) for i in range(len(items)) for s in range(k)]  # (item, sample) of each completion
    mine = rows[env.rank :: env.world]
    real = len(mine)
    if synced:
        mine += rows[:1] * (-(-len(rows) // env.world) - real)
    prompts = [items[i] for i, _ in mine]
    seeds = [row_seed(sampling.seed, i, s) for i, s in mine] if sampling is not None else []
    texts: list[str] = []
    if mine:
        texts = completion_texts(
            policy,
            prompts,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            seeds=seeds,
            synced=synced,
        )[:real]
    mine, prompts = mine[:real], prompts[:real]
    crash_point("eval")
    judged = list(zip(mine, texts, judge.judge(prompts, texts) if mine else []))
    everything = sorted((r for part in all_gather_objects(judged, env) for r in part), key=lambda r: r[0])
    records = [
        {
            "item": i,
            "sample": s,
            "question": items[i]["question"],
            "level": items[i]["level"],
            "image": items[i]["image"],
            "completion": text,
            "strategy": None if j is None else j.strategy,
            "factual_pass": None if j is None else j.factual_pass,
            "reward": rubric_reward(j),
        }
        for (i, s), text, j in everything
    ]
    levels, judgments = [items[i]["level"] for (i, _), _, _ in everything], [j for _, _, j in everything]
    summary = level_summary(levels, judgments, k)
    return Evaluation(eval_metrics(levels, judgments, k), summary, records)


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A plain-text table: metric, warm start, after GRPO, change."""
    lines = [f"{'val split (greedy)':<28} {'before':>8} {'after':>8} {'change':>8}"]
    for key, label in TABLE_METRICS:
        b, a = before[key], after[key]
        lines.append(f"{label:<28} {b:8.3f} {a:8.3f} {a - b:+8.3f}")
    return "\n".join(lines)


def format_levels(summary: dict[str, dict[str, float]]) -> str:
    """`level_summary` as a Markdown table: a row per level, then overall; "-" where nothing was scored."""
    lines = [
        "| level | items | strategy accuracy | factual pass | mean reward | unscorable |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        rates = ["-" if math.isnan(row[k]) else f"{row[k]:.3f}" for k in ("strategy_acc", "factual_pass", "reward")]
        lines.append(f"| {name} | {row['items']:.0f} | {' | '.join(rates)} | {row['unscorable']:.0f} |")
    return "\n".join(lines)
