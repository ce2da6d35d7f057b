"""The rubric shared by every judge: a per-completion verdict and its reward (docs/design.md, "Rewards").

A judge sees a batch of completions with their items and returns one `Judgment` per completion, or
None when it cannot score one (an unparseable LLM reply, say). `rubric_reward` turns a judgment into
the scalar reward GRPO normalizes: strategy 1 -> 0.0, 2 -> 0.6, 3 -> 0.8, 4 -> 1.0, minus 0.3 on a
factual FAIL, never below 0. An unscorable completion gets reward None (NaN in the advantage kernel,
which gives it advantage 0 and leaves it out of its group's statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

STRATEGY_REWARD = {1: 0.0, 2: 0.6, 3: 0.8, 4: 1.0}
FACTUAL_FAIL_PENALTY = 0.3


@dataclass(frozen=True)
class Judgment:
    """One completion's verdict: strategy score in 1..4 and whether every stated fact is in the image."""

    strategy: int
    factual_pass: bool

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_REWARD:
            raise ValueError(f"strategy score must be one of 1, 2, 3, 4, got {self.strategy!r}")


def rubric_reward(judgment: Judgment | None) -> float | None:
    """The rubric's reward in [0, 1] for one judgment; None stays None (unscorable)."""
    if judgment is None:
        return None
    reward = STRATEGY_REWARD[judgment.strategy]
    if not judgment.factual_pass:
        reward -= FACTUAL_FAIL_PENALTY
    return max(reward, 0.0)


class Judge(Protocol):
    """Scores a batch of completions against their items (one item per completion, repeated per sample).

    `items` are the dataset rows (dicts with at least "question", "level" and "image"; synthetic rows also
    carry the scene's ground truth). Returns one Judgment, or None for an unscorable completion, per input.
    `required_fields` names the fields an item needs to be scored at all.
    """

    required_fields: tuple[str, ...]

    def judge(self, items: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[Judgment | None]: ...


class JudgeReward:
    """Adapts a Judge to TRL's reward-function shape: `(prompts, completions, **columns) -> list[float | None]`.

    `columns` holds the dataset's fields as lists aligned with `completions` (question, level, image, ...),
    as TRL passes them; they are zipped back into per-completion items for the judge.
    """

    def __init__(self, judge: Judge, name: str | None = None) -> None:
        self.judge = judge
        self.__name__ = name or type(judge).__name__

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float | None]:
        for key, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(f"column {key!r} has {len(values)} values for {len(completions)} completions")
        items = [{key: values[i] for key, values in columns.items()} for i in range(len(completions))]
        return [rubric_reward(j) for j in self.judge.judge(items, completions)]
