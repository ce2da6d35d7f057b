"""Probes what a tiny-model checkpoint has learned on the synthetic val split, beyond the rubric reward.

    python scripts/probe_policy.py runs/warm-start/checkpoint data/synthetic
    python scripts/probe_policy.py runs/grpo-tiny/final data/synthetic --items 100

Greedy replies (as the trainer's eval): share that asks, names the question's shape, repeats its size word, and
of the plain answers the share whose colour is the referent's. Teacher-forced probes (no sampling):
- colour: argmax over the five colours of log p("The <noun> is <colour>.") against the referent's colour, on
  unambiguous items, with the item's own image and with another item's image (shuffled: chance is about 0.2);
- count: log p("I see one <noun>") vs "I see two/three <noun>s" after "How many <noun>s do you see?", i.e. whether
  the model tells one referent from several (only meaningful after SFT with --count > 0);
- ask: mean log p("Which <noun> do you mean?") - log p("The <noun> is <colour>.") per level;
- caption words: mean loss (nats) of the colour, shape and size words of the captioning target ("I see a big red
  triangle and ..."), with own and shuffled images: a word class whose loss does not drop with the own image is
  not seen (shape: ln 4 = 1.39 nats when the model only knows which shapes are common).
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from grpo_fast.data.phrasing import DESCRIBE_QUESTION, count_question, describe
from grpo_fast.data.scene import COLOURS, SHAPES, SIZES, Scene, Target
from grpo_fast.data.seed import load_seed
from grpo_fast.models import Policy, load_policy
from grpo_fast.models.inputs import Batch, collate
from grpo_fast.rewards.judge import rubric_reward
from grpo_fast.rewards.rule_judge import RuleJudge
from grpo_fast.trainer.evaluation import completion_texts


@torch.no_grad()
def token_logp(policy: Policy, items: Sequence[dict[str, Any]], texts: Sequence[str]) -> tuple[torch.Tensor, Batch]:
    """`[B, C]` log-probs of each token of `texts` as completions of `items`, and the batch (ids and mask)."""
    batch = collate(policy, items, texts)
    width = batch.completion_ids.shape[1]
    logits = policy.model(**batch.model_inputs(), logits_to_keep=width + 1).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1), batch


def logp(policy: Policy, items: Sequence[dict[str, Any]], texts: Sequence[str], eos: bool = True) -> torch.Tensor:
    """`[B]` summed log-probs of `texts` as completions of `items` (with the final eos unless `eos` is False)."""
    token_lp, batch = token_logp(policy, items, texts)
    mask = batch.completion_mask.clone()
    if not eos:
        mask[torch.arange(len(items)), mask.sum(1) - 1] = 0
    return (token_lp * mask).sum(1)


def _truth(item: dict[str, Any]) -> tuple[Scene, Target, list[str]]:
    scene, target = Scene.from_dict(item["scene"]), Target(**item["target"])
    return scene, target, [o.colour for o in scene.referents(target)]


def greedy_report(policy: Policy, items: list[dict[str, Any]]) -> None:
    texts = completion_texts(policy, items, batch_size=64, max_new_tokens=40)
    judgments = RuleJudge().judge(items, texts)
    print(f"greedy mean reward {sum(rubric_reward(j) for j in judgments) / len(items):.3f}")
    for level in ("ambig", "unambig"):
        replies = [(it, t) for it, t in zip(items, texts) if it["level"] == level]
        asks = names = answers = right = sized = size_kept = 0
        for it, text in replies:
            _, target, colours = _truth(it)
            low = text.lower()
            named = {s for s in SHAPES if re.search(rf"\b{s}s?\b", low)}
            names += named == {target.shape}
            if target.size:
                sized += 1
                size_kept += target.size in low
            if "?" in text:
                asks += 1
            else:
                answers += 1
                said = {c for c in COLOURS if c in low}
                right += bool(said) and said <= set(colours)
        print(
            f"  {level}: asks {asks / len(replies):.2f}, names the question's shape (only) {names / len(replies):.2f}, "
            f"keeps its size word {size_kept / max(sized, 1):.2f}, answers with a referent's colour "
            f"{right / max(answers, 1):.2f} of {answers}"
        )
    for it, text in list(zip(items, texts))[:6]:
        print(f"    [{it['level']}] {it['question']} -> {text}")


def colour_probe(policy: Policy, items: list[dict[str, Any]], shuffle: bool) -> float:
    images = [it["image"] for it in items]
    if shuffle:
        random.Random(0).shuffle(images)
    hits = 0
    for it, image in zip(items, images):
        _, target, colours = _truth(it)
        scores = logp(policy, [it | {"image": image}] * len(COLOURS), [f"The {target.noun} is {c}." for c in COLOURS])
        hits += list(COLOURS)[int(scores.argmax())] in colours
    return hits / len(items)


def count_probe(policy: Policy, items: list[dict[str, Any]]) -> dict[str, float]:
    right = {"one": [0, 0], "several": [0, 0]}
    for it in items:
        _, target, colours = _truth(it)
        asked = it | {"question": count_question(target)}
        texts = [f"I see one {target.noun}", f"I see two {target.noun}s", f"I see three {target.noun}s"]
        says_several = int(logp(policy, [asked] * 3, texts, eos=False).argmax()) > 0
        key = "several" if len(colours) > 1 else "one"
        right[key][0] += says_several == (key == "several")
        right[key][1] += 1
    return {k: hit / max(n, 1) for k, (hit, n) in right.items()}


def ask_log_odds(policy: Policy, items: list[dict[str, Any]]) -> float:
    odds = []
    for it in items:
        _, target, colours = _truth(it)
        scores = logp(policy, [it, it], [f"Which {target.noun} do you mean?", f"The {target.noun} is {colours[0]}."])
        odds.append(float(scores[0] - scores[1]))
    return sum(odds) / len(odds)


@torch.no_grad()
def caption_word_loss(policy: Policy, items: list[dict[str, Any]], shuffle: bool) -> dict[str, float]:
    """Mean loss (nats) of the colour / shape / size words of the items' captions, own or shuffled images."""
    images = [it["image"] for it in items]
    if shuffle:
        random.Random(0).shuffle(images)
    classes = {**dict.fromkeys(COLOURS, "colour"), **dict.fromkeys(SHAPES, "shape"), **dict.fromkeys(SIZES, "size")}
    losses: dict[str, list[float]] = {"colour": [], "shape": [], "size": []}
    for i in range(0, len(items), 16):
        chunk = [
            it | {"question": DESCRIBE_QUESTION, "image": im} for it, im in zip(items[i : i + 16], images[i : i + 16])
        ]
        token_lp, batch = token_logp(policy, chunk, [describe(Scene.from_dict(it["scene"])) for it in chunk])
        for ids, mask, row in zip(batch.completion_ids, batch.completion_mask, token_lp):
            for token, on, lp in zip(ids.tolist(), mask.tolist(), row.tolist()):
                word = policy.tokenizer.decode([token]).strip()
                if on and word in classes:
                    losses[classes[word]].append(-lp)
    return {k: sum(v) / max(len(v), 1) for k, v in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a policy folder (load_policy)")
    parser.add_argument("data", help="synthetic data folder (val.jsonl with scene and target)")
    parser.add_argument("--items", type=int, default=200, help="val items for the greedy replies")
    parser.add_argument("--probe-items", type=int, default=60, help="items per level for the teacher-forced probes")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation (see the tiny preset)
    policy = load_policy(args.checkpoint)
    policy.model.eval()
    items = load_seed(f"{args.data}/val.jsonl")
    greedy_report(policy, items[: args.items])
    ambig = [it for it in items if it["level"] == "ambig"][: args.probe_items]
    unambig = [it for it in items if it["level"] == "unambig"][: args.probe_items]
    print(
        f"colour probe (unambig): own image {colour_probe(policy, unambig, False):.2f}, "
        f"shuffled images {colour_probe(policy, unambig, True):.2f} (chance ~0.2)"
    )
    counts = count_probe(policy, ambig + unambig)
    print(f"count probe: says one when one {counts['one']:.2f}, says several when several {counts['several']:.2f}")
    print(f"ask log-odds: ambig {ask_log_odds(policy, ambig):+.2f}, unambig {ask_log_odds(policy, unambig):+.2f}")
    for shuffle in (False, True):
        losses = caption_word_loss(policy, ambig + unambig, shuffle)
        print(
            f"caption word loss ({'shuffled' if shuffle else 'own'} images, nats): "
            + ", ".join(f"{k} {v:.2f}" for k, v in losses.items())
        )


if __name__ == "__main__":
    main()
