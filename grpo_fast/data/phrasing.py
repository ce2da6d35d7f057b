"""Wording of synthetic questions and replies, in the seed data's style.

Two reply forms exist: a plain answer ("The triangle is red.") and a clarification, either a bare
question ("Which triangle do you mean?") or one that names the readings ("There are two triangles: a red
one and a blue one. Which one do you mean?"). Gold answers use the form the item's level calls for;
warm-start targets (`warm_start_reply`) draw the form independently of the level.
"""

from __future__ import annotations

import random

from grpo_fast.data.scene import NUMBER_WORDS, Scene, SceneObject, Target

QUESTIONS = (
    "What colour is the {noun}?",
    "What is the colour of the {noun}?",
    "Which colour does the {noun} have?",
    "Can you tell me the colour of the {noun}?",
)
ANSWERS = (
    "The {noun} is {colour}.",
    "It is {colour}.",
    "The {noun} in the picture is {colour}.",
)
BARE_CLARIFICATIONS = (
    "Which {noun} do you mean?",
    "Could you tell me which {noun} you mean?",
)
ENUMERATIONS = (
    "There are {count} {nouns}: {ones}. Which one do you mean?",
    "The question is ambiguous, because I see {count} {nouns}: {ones}. Which one are you asking about?",
    "I see {full}. Do you mean {choices}?",
)


def _join(parts: list[str], conjunction: str = "and") -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" {conjunction} " + parts[-1]


DESCRIBE_QUESTION = "What do you see in the picture?"


def describe(scene: Scene) -> str:
    """Every object, left to right, e.g. "I see a big red triangle and a small blue circle." (a captioning target)."""
    objects = sorted(scene.objects, key=lambda o: (o.x, o.y))
    return "I see " + _join([f"a {o.size} {o.colour} {o.shape}" for o in objects]) + "."


COUNT_QUESTION = "How many {nouns} do you see?"


def count_question(target: Target) -> str:
    """A question about how many objects fit `target` (an SFT task that reads the question's noun)."""
    return COUNT_QUESTION.format(nouns=target.noun + "s")


def count_reply(scene: Scene, target: Target) -> str:
    """How many objects fit `target` and their colours, left to right, e.g. "I see two circles: a red one and a
    blue one." (the answer to `count_question`)."""
    colours = [o.colour for o in sorted(scene.referents(target), key=lambda o: (o.x, o.y))]
    nouns = target.noun if len(colours) == 1 else target.noun + "s"
    return f"I see {NUMBER_WORDS[len(colours)]} {nouns}: " + _join([f"a {c} one" for c in colours]) + "."


def question(target: Target, rng: random.Random) -> str:
    """A question about the colour of `target`."""
    return rng.choice(QUESTIONS).format(noun=target.noun)


def plain_answer(scene: Scene, target: Target, rng: random.Random) -> str:
    """A direct answer about one referent (chosen at random when there are several)."""
    obj: SceneObject = rng.choice(scene.referents(target))
    return rng.choice(ANSWERS).format(noun=target.noun, colour=obj.colour)


def clarification(scene: Scene, target: Target, rng: random.Random, *, enumerate_readings: bool) -> str:
    """A clarifying question; with `enumerate_readings` it names every referent (needs at least two)."""
    if not enumerate_readings:
        return rng.choice(BARE_CLARIFICATIONS).format(noun=target.noun)
    colours = [o.colour for o in scene.referents(target)]
    if len(colours) < 2:
        raise ValueError(f"cannot enumerate readings of {target.noun!r}: the scene has {len(colours)} of them")
    return rng.choice(ENUMERATIONS).format(
        count=NUMBER_WORDS[len(colours)],
        nouns=target.noun + "s",
        ones=_join([f"a {c} one" for c in colours]),
        full=_join([f"a {target.with_colour(c)}" for c in colours]),
        choices=_join([f"the {c} one" for c in colours], "or"),
    )


def gold_answer(scene: Scene, target: Target, rng: random.Random) -> str:
    """The ideal reply: answer when there is one referent, name the readings and ask when there are several."""
    if len(scene.referents(target)) > 1:
        return clarification(scene, target, rng, enumerate_readings=True)
    return plain_answer(scene, target, rng)


def warm_start_reply(scene: Scene, target: Target, rng: random.Random) -> str:
    """An SFT target whose form (answer / clarify) is a coin flip independent of the level; always true to the scene.

    Clarifications name the readings only when there are several (half the time), so every target is factual.
    """
    if rng.random() < 0.5:
        return plain_answer(scene, target, rng)
    ambiguous = len(scene.referents(target)) > 1
    return clarification(scene, target, rng, enumerate_readings=ambiguous and rng.random() < 0.5)
