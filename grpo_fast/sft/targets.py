"""SFT targets: the reply each drawn item is trained on.

"mixed" (the default): a coin flip per item, independent of its level, picks a plain answer or a clarifying
question (naming the readings when there are several), always true to the scene; a share of the items become
captioning ("What do you see in the picture?": every object, left to right) and a share counting ("How many
circles do you see?" -> "I see two circles: a red one and a blue one."). "gold": the dataset's own answers.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from grpo_fast.data.phrasing import DESCRIBE_QUESTION, count_question, count_reply, describe, warm_start_reply
from grpo_fast.data.scene import Scene, Target

Targets = Literal["mixed", "gold"]


def describe_share(step: int, *, steps: int, start: float, end: float | None) -> float:
    """The captioning share at `step` of `steps`: `start`, moving linearly to `end` at the last step when set."""
    if end is None:
        return start
    return start + (end - start) * step / max(steps - 1, 1)


def sft_examples(
    items: list[dict[str, Any]], rng: random.Random, *, targets: Targets, caption_share: float, count_share: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """(items, target replies) for one step; "mixed" turns a share of the items into captioning or counting
    examples (their question replaced) and draws an answer or a question for the rest."""
    if targets == "gold":
        return items, [it["answer"] for it in items]
    out_items, replies = [], []
    for it in items:
        scene = Scene.from_dict(it["scene"])
        draw = rng.random()
        if draw < caption_share:
            out_items.append(it | {"question": DESCRIBE_QUESTION})
            replies.append(describe(scene))
        elif draw < caption_share + count_share:
            target = Target(**it["target"])
            out_items.append(it | {"question": count_question(target)})
            replies.append(count_reply(scene, target))
        else:
            out_items.append(it)
            replies.append(warm_start_reply(scene, Target(**it["target"]), rng))
    return out_items, replies
