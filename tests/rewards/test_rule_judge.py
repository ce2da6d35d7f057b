"""RuleJudge on a table of phrasings, on generated gold and warm-start replies, and through the reward mapping."""

import pytest

from grpo_fast.data import Scene, SceneObject, Target, gold_answer, warm_start_reply
from grpo_fast.data.phrasing import count_reply
from grpo_fast.data.synthetic import item_rng, sample_scene
from grpo_fast.rewards import JudgeReward, RuleJudge

# Two triangles (big red, small blue), one big green circle, one small yellow square.
SCENE = Scene(
    200,
    120,
    (240, 240, 240),
    (
        SceneObject("triangle", "red", "big", 30, 30),
        SceneObject("triangle", "blue", "small", 90, 30),
        SceneObject("circle", "green", "big", 150, 60),
        SceneObject("square", "yellow", "small", 40, 90),
    ),
)
AMBIG = {"level": "ambig", "target": {"shape": "triangle", "size": None}, "scene": SCENE.to_dict()}
UNAMBIG = {"level": "unambig", "target": {"shape": "circle", "size": None}, "scene": SCENE.to_dict()}
SMALL_TRIANGLE = {"level": "unambig", "target": {"shape": "triangle", "size": "small"}, "scene": SCENE.to_dict()}

CASES = [
    # ambiguous "What colour is the triangle?": ask / enumerate -> 3-4, hedge -> 2, pick one -> 1
    (AMBIG, "There are two triangles: a red one and a blue one. Which one do you mean?", 4, True),
    (AMBIG, "Do you mean the red triangle or the blue triangle?", 4, True),
    (AMBIG, "The question is ambiguous: I see a red triangle and a blue triangle.", 4, True),
    (AMBIG, "There are two triangles. Which one do you mean?", 4, True),
    (AMBIG, "Which triangle do you mean?", 3, True),
    (AMBIG, "The question is ambiguous: I see more than one triangle. Which one do you mean?", 4, True),
    (AMBIG, "There are several triangles. Which one do you mean?", 4, True),
    (AMBIG, "There are two triangles triangles: a red one and a blue one. Which one?", 3, True),  # not fluent
    (AMBIG, "I'm not sure.", 2, True),
    (AMBIG, "I am not sure which triangle you mean.", 2, True),
    (AMBIG, "The triangle is red.", 1, True),
    (AMBIG, "It is blue.", 1, True),
    (AMBIG, "The triangle is green.", 1, False),
    (AMBIG, "There is only one triangle and it is red.", 1, False),
    (AMBIG, "There are three triangles: a red one, a blue one and a green one. Which one?", 4, False),
    (AMBIG, "There are three triangles. Which one do you mean?", 4, False),  # the count alone is wrong
    (AMBIG, "Which triangle do you mean, the red one or the purple one?", 4, False),
    # unambiguous "What colour is the circle?": plain correct answer -> 4, speculation -> 2, ask back -> 1
    (UNAMBIG, "The circle is green.", 4, True),
    (UNAMBIG, "It is green.", 4, True),
    (UNAMBIG, "Green.", 4, True),
    (UNAMBIG, "The circle in the picture is green, which is a colour that many people like a lot.", 3, True),
    (UNAMBIG, "The circle is red.", 3, False),
    (UNAMBIG, "The circle is orange.", 3, False),
    (UNAMBIG, "The circle is is green", 2, True),
    (UNAMBIG, "I'm not sure, maybe the circle is green.", 2, True),
    (UNAMBIG, "The circle is green or blue.", 2, True),
    (UNAMBIG, "Which circle do you mean?", 1, True),
    (UNAMBIG, "There is more than one circle in the picture. Which one are you asking about?", 1, False),
    (UNAMBIG, "There are two circles: a green one and a red one. Which one do you mean?", 1, False),
    (UNAMBIG, "I cannot answer that.", 1, True),
    (UNAMBIG, "I'm not sure.", 1, True),
    (UNAMBIG, "There is no circle in the picture.", 1, False),
    (UNAMBIG, "The green circle is next to a purple star.", 4, False),
    (UNAMBIG, "The circle is green and there is one small square.", 4, True),
    # a size narrows the referents: only the small triangle (blue) counts
    (SMALL_TRIANGLE, "The small triangle is blue.", 4, True),
    (SMALL_TRIANGLE, "The small triangle is red.", 3, False),
    (SMALL_TRIANGLE, "It is red.", 3, False),
    (SMALL_TRIANGLE, "Which small triangle do you mean?", 1, True),
]


@pytest.mark.parametrize("item, text, strategy, factual", CASES, ids=[c[1][:40] for c in CASES])
def test_phrasing_table(item, text, strategy, factual):
    judgment = RuleJudge().judge_one(item, text)
    assert (judgment.strategy, judgment.factual_pass) == (strategy, factual)


def _generated(n: int):
    for i in range(n):
        rng = item_rng(11, "test", i)
        scene, target = sample_scene(rng, ambiguous=i % 2 == 0)
        item = {"level": "ambig" if i % 2 == 0 else "unambig", "scene": scene.to_dict()}
        yield item | {"target": {"shape": target.shape, "size": target.size}}, scene, target, rng


def test_gold_answers_are_ideal_and_factual():
    judge = RuleJudge()
    for item, scene, target, rng in _generated(200):
        text = gold_answer(scene, target, rng)
        assert (judge.judge_one(item, text).strategy, judge.judge_one(item, text).factual_pass) == (4, True), text


def test_warm_start_replies_are_factual_and_both_forms_appear_at_both_levels():
    judge = RuleJudge()
    seen = set()
    for item, scene, target, rng in _generated(200):
        text = warm_start_reply(scene, target, rng)
        judgment = judge.judge_one(item, text)
        assert judgment.factual_pass, text
        seen.add((item["level"], "?" in text, judgment.strategy))
    # answers and questions at both levels: right form -> 3/4, wrong form -> 1
    assert {
        ("ambig", False, 1),
        ("ambig", True, 4),
        ("ambig", True, 3),
        ("unambig", False, 4),
        ("unambig", True, 1),
    } <= seen


def test_count_replies_are_factual():
    judge = RuleJudge()
    for item, scene, target, _ in _generated(200):
        text = count_reply(scene, target)
        assert judge.judge_one(item, text).factual_pass, text


def test_judge_reward_maps_judgments_and_leaves_items_without_ground_truth_unscored():
    reward = JudgeReward(RuleJudge())
    completions = ["The triangle is red.", "Which triangle do you mean?", "The circle is red.", "Anything."]
    columns = {
        "level": ["ambig", "ambig", "unambig", "ambig"],
        "target": [AMBIG["target"], AMBIG["target"], UNAMBIG["target"], None],
        "scene": [SCENE.to_dict()] * 3 + [None],
    }
    # strategy 1 -> 0.0; 3 -> 0.8; 3 with FAIL -> 0.8 - 0.3 = 0.5; no ground truth -> None
    assert reward([""] * 4, completions, **columns) == pytest.approx([0.0, 0.8, 0.5, None])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 items for 1 completions"):
        RuleJudge().judge([AMBIG, AMBIG], ["x"])


def test_target_noun_phrases():
    assert Target("triangle", "small").with_colour("red") == "small red triangle"
    assert Target("triangle").with_colour("red") == "red triangle" and Target("circle", "big").noun == "big circle"
