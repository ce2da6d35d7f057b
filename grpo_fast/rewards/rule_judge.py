"""RuleJudge: the offline rubric judge, exact on the synthetic data (items carry `scene` and `target`).

Strategy (docs/design.md, "Rewards") from surface cues of the completion:
- asks: a question with a clarification cue ("which", "do you mean", "clarify", "... or ...?").
- lists: names two or more colours for the asked-about shape ("a red one and a blue one").
- notes: says there are several ("ambiguous", "more than one", "two triangles", the plural of the shape).
- hedges: "not sure", "can't tell", "maybe", "green or blue", ...; refuses: "cannot answer", "there is no ...".
ambig: asks or lists -> 4 when it also notes the ambiguity (or both asks and lists) and reads fluently, else 3;
hedges or notes only -> 2; otherwise (answers as if there were one referent) -> 1.
unambig: asks, notes or refuses -> 1; no colour given -> 1; hedges or several colours or not fluent -> 2;
a fluent answer -> 4 when correct and at most 12 words, else 3.
Factual: FAIL when a colour or shape is named that the scene lacks, a colour is bound to a shape no object
of that colour has ("the red triangle", "the triangle is red", "a red one", "it is red"), or a count is wrong
("two triangles", "only one triangle", "more than one triangle"). Items without ground truth are unscorable (None).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

from grpo_fast.data.scene import COLOURS, NUMBER_WORDS, SHAPES, SIZES, Scene, Target
from grpo_fast.rewards.judge import Judgment

# Words outside the synthetic world that a completion may still use: naming one is always a factual error.
OTHER_COLOURS = ("orange", "pink", "black", "white", "grey", "gray", "brown", "cyan")
OTHER_SHAPES = ("rectangle", "star", "hexagon", "oval", "pentagon", "heart", "cross")

ALL_COLOURS = (*COLOURS, *OTHER_COLOURS)
ALL_SHAPES = (*SHAPES, *OTHER_SHAPES)
_COLOUR = "|".join(ALL_COLOURS)
_SHAPE = "|".join(ALL_SHAPES)
_SIZE = "|".join(SIZES)
_NUM = "|".join(NUMBER_WORDS.values())
_COLOUR_SHAPE = re.compile(rf"\b(?:({_SIZE}) )?({_COLOUR}) (?:({_SIZE}) )?({_SHAPE})s?\b")
_SHAPE_IS_COLOUR = re.compile(rf"\b(?:({_SIZE}) )?({_SHAPE}) (?:in the (?:picture|image) )?is ({_COLOUR})\b")
_REFERENT_IS_COLOUR = re.compile(rf"\b(?:it is|it's|its colour is|(?:one|other|another) is) ({_COLOUR})\b")
_COLOUR_ONE = re.compile(rf"\b({_COLOUR}) ones?\b")
_COUNT = re.compile(rf"(?<!more than )\b({_NUM}) (?:({_SIZE}) )?(?:(?:{_COLOUR}) )?({_SHAPE})s?\b")
_ONLY_ONE = re.compile(rf"\b(?:only one|just one|a single|exactly one) (?:({_SIZE}) )?({_SHAPE})\b")
_SEVERAL = re.compile(rf"\b(?:more than one|several|multiple) (?:({_SIZE}) )?({_SHAPE})s?\b")
_NONE = re.compile(
    rf"\b(?:there is no|there are no|i see no|i don't see any|i do not see any) (?:({_SIZE}) )?({_SHAPE})"
)
# Quantified claims about a shape, each with the test its count in the scene must pass.
_QUANTIFIED = ((_ONLY_ONE, lambda n: n == 1), (_SEVERAL, lambda n: n >= 2), (_NONE, lambda n: n == 0))

_ASK_CUE = re.compile(r"\b(?:which|do you mean|you mean|are you asking|clarify|specify)\b|\bor\b")
_AMBIGUITY = re.compile(r"\b(?:ambiguous|ambiguity|more than one|several|multiple|both|unclear which)\b")
_HEDGE = re.compile(
    r"\b(?:not sure|unsure|uncertain|not certain|can't tell|cannot tell|hard to (?:say|tell)|don't know|do not know"
    r"|no idea|maybe|perhaps|probably|might)\b"
)
_ALTERNATIVES = re.compile(rf"\b(?:{_COLOUR}) or (?:{_COLOUR})\b")  # "green or blue": speculation
_REFUSE = re.compile(r"\b(?:cannot answer|can't answer|unable to answer|won't answer)\b")
_FLUENT_CHARS = re.compile(r"[A-Za-z][A-Za-z ,.:;'?!-]*[.?!]")
MAX_WORDS, MAX_CONCISE_WORDS = 40, 12


def _exists(scene: Scene, shape: str, colour: str | None = None, size: str | None = None) -> bool:
    return any(
        o.shape == shape and (colour is None or o.colour == colour) and (size is None or o.size == size)
        for o in scene.objects
    )


def _count(scene: Scene, shape: str, size: str | None) -> int:
    return sum(Target(shape, size).matches(o) for o in scene.objects)


def factual_pass(text: str, scene: Scene, target: Target) -> bool:
    """True when every colour, shape, colour-shape pairing and count the text states holds in the scene."""
    t = text.lower()
    words = re.findall(r"[a-z]+", t)
    colours, shapes = {o.colour for o in scene.objects}, {o.shape for o in scene.objects}
    for w in words:
        if w in ALL_COLOURS and w not in colours:
            return False
        singular = w.removesuffix("s")
        if singular in ALL_SHAPES and singular not in shapes:
            return False
    for size1, colour, size2, shape in _COLOUR_SHAPE.findall(t):
        if not _exists(scene, shape, colour, size1 or size2 or None):
            return False
    for size, shape, colour in _SHAPE_IS_COLOUR.findall(t):
        if not _exists(scene, shape, colour, size or None):
            return False
    referent_colours = {o.colour for o in scene.referents(target)}
    if any(c not in referent_colours for c in [*_REFERENT_IS_COLOUR.findall(t), *_COLOUR_ONE.findall(t)]):
        return False
    number = {word: n for n, word in NUMBER_WORDS.items()}
    if any(_count(scene, shape, size or None) != number[n] for n, size, shape in _COUNT.findall(t)):
        return False
    return all(
        holds(_count(scene, shape, size or None))
        for pattern, holds in _QUANTIFIED
        for size, shape in pattern.findall(t)
    )


def _target_colours(t: str, target: Target) -> set[str]:
    """Colours the (lower-cased) text gives to the asked-about shape."""
    found = {c for s1, c, s2, shape in _COLOUR_SHAPE.findall(t) if shape == target.shape}
    found |= {c for _, shape, c in _SHAPE_IS_COLOUR.findall(t) if shape == target.shape}
    return found | set(_REFERENT_IS_COLOUR.findall(t)) | set(_COLOUR_ONE.findall(t))


def _fluent(text: str) -> bool:
    """Plain sentences: letters and punctuation, ends with . ? or !, no word said twice in a row, not rambling."""
    words = [w.strip(",.:;?!").lower() for w in text.split()]
    return (
        _FLUENT_CHARS.fullmatch(text.strip()) is not None
        and len(words) <= MAX_WORDS
        and all(a != b for a, b in itertools.pairwise(words))
    )


def strategy_score(text: str, level: str, scene: Scene, target: Target) -> int:
    """The rubric's strategy score 1-4 of one completion for an item of `level` ("ambig" or "unambig")."""
    t = text.lower()
    given = _target_colours(t, target)
    asks = "?" in t and _ASK_CUE.search(t) is not None
    lists = len(given) >= 2
    notes = _AMBIGUITY.search(t) is not None or re.search(rf"\b{target.shape}s\b", t) is not None
    hedges = _HEDGE.search(t) is not None or _ALTERNATIVES.search(t) is not None
    if level == "ambig":
        if asks or lists:
            return 4 if (notes or (asks and lists)) and _fluent(text) else 3
        return 2 if hedges or notes else 1
    if asks or notes or _REFUSE.search(t):
        return 1
    if not given:  # a bare colour ("Red.") still answers the question
        given = {w for w in re.findall(r"[a-z]+", t) if w in ALL_COLOURS}
    if not given:
        return 1
    if hedges or len(given) > 1 or not _fluent(text):
        return 2
    correct = given == {o.colour for o in scene.referents(target)}
    return 4 if correct and len(text.split()) <= MAX_CONCISE_WORDS else 3


class RuleJudge:
    """Scores completions by rules against the items' ground truth (`scene`, `target`); see the module doc."""

    required_fields = ("level", "scene", "target")  # what an item needs to be scored

    def judge(self, items: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[Judgment | None]:
        if len(items) != len(completions):
            raise ValueError(f"got {len(items)} items for {len(completions)} completions")
        return [self.judge_one(item, text) for item, text in zip(items, completions)]

    def judge_one(self, item: dict[str, Any], completion: str) -> Judgment | None:
        """One completion's judgment, or None when the item has no `scene`/`target` ground truth."""
        if item.get("scene") is None or item.get("target") is None:
            return None
        scene, target = Scene.from_dict(item["scene"]), Target(**item["target"])
        return Judgment(
            strategy=strategy_score(completion, item["level"], scene, target),
            factual_pass=factual_pass(completion, scene, target),
        )
