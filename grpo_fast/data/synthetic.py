"""Synthetic ambiguity data: PIL scenes of coloured shapes and colour questions about one kind of shape.

An item is unambiguous when exactly one object fits the question ("What colour is the triangle?" with one
triangle) and ambiguous when two or three do. Each line is in the seed format plus the ground truth the rule
judge checks: `target` (what the question refers to) and `scene` (every object with shape, colour, size and
position). Levels alternate within each split (balanced), canvases have varied sizes and aspect ratios (so
tiling gives 1..N tiles), and everything is a function of the seed.

    python -m grpo_fast.data.synthetic --out data/synthetic --n 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from grpo_fast.data.phrasing import gold_answer, question, warm_start_reply
from grpo_fast.data.scene import COLOURS, RADIUS, SHAPES, SIZES, Scene, SceneObject, Target, render

SPLITS = ("train", "val")
MIN_SIDE, MAX_SIDE = 96, 192  # canvas side range in pixels
MARGIN = 3  # minimum gap in pixels between objects and to the border


def _place(rng: random.Random, width: int, height: int, specs: list[tuple[str, str, str]]) -> list[SceneObject] | None:
    """Non-overlapping positions for (shape, colour, size) specs, or None when they do not fit."""
    placed: list[SceneObject] = []
    for shape, colour, size in specs:
        r = RADIUS[size]
        for _ in range(100):
            x, y = rng.randint(r + MARGIN, width - r - MARGIN), rng.randint(r + MARGIN, height - r - MARGIN)
            # Bounding squares must not overlap (shapes are drawn inside their square).
            if all(max(abs(x - o.x), abs(y - o.y)) > r + RADIUS[o.size] + MARGIN for o in placed):
                placed.append(SceneObject(shape, colour, size, x, y))
                break
        else:
            return None
    return placed


def sample_scene(rng: random.Random, ambiguous: bool) -> tuple[Scene, Target]:
    """A scene and a target with one referent (or two to three when `ambiguous`) plus 1-3 distractors."""
    target = Target(rng.choice(SHAPES), rng.choice(SIZES) if rng.random() < 0.25 else None)
    n_referents = rng.choice((2, 2, 3)) if ambiguous else 1
    # Referents get distinct colours so that the readings can be told apart by name.
    specs = [(target.shape, c, target.size or rng.choice(SIZES)) for c in rng.sample(list(COLOURS), n_referents)]
    if target.size and rng.random() < 0.5:  # the same shape in the other size: a near miss, not a referent
        specs.append((target.shape, rng.choice(list(COLOURS)), next(s for s in SIZES if s != target.size)))
    others = [s for s in SHAPES if s != target.shape]
    specs += [(rng.choice(others), rng.choice(list(COLOURS)), rng.choice(SIZES)) for _ in range(rng.randint(1, 3))]
    rng.shuffle(specs)
    while True:
        width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        objects = _place(rng, width, height, specs)
        if objects is not None:
            base = rng.randint(225, 250)
            background = (base + rng.randint(-5, 5), base + rng.randint(-5, 5), base + rng.randint(-5, 5))
            return Scene(width, height, background, tuple(objects)), target


def item_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of one item: items are independent of each other and of the split sizes."""
    return random.Random(f"{seed}/{split}/{index}")


def write_dataset(out: Path | str, n: int, seed: int, val_fraction: float = 0.1) -> dict[str, Path]:
    """Writes `out/{train,val}.jsonl` and `out/images/*.png`; returns the jsonl path of each split."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (one item per split), got {n}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    paths = {}
    for split, count in zip(SPLITS, (n - n_val, n_val)):
        paths[split] = out / f"{split}.jsonl"
        with open(paths[split], "w") as f:
            for i in range(count):
                rng = item_rng(seed, split, i)
                scene, target = sample_scene(rng, ambiguous=i % 2 == 0)
                image = f"images/{split}_{i:05d}.png"
                render(scene).save(out / image)
                line = {
                    "image": image,
                    "level": "ambig" if i % 2 == 0 else "unambig",
                    "question": question(target, rng),
                    "answer": gold_answer(scene, target, rng),
                    "target": {"shape": target.shape, "size": target.size},
                    "scene": scene.to_dict(),
                }
                f.write(json.dumps(line) + "\n")
    return paths


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts in the generator's vocabulary (questions, gold and warm-start replies), for training a tokenizer."""
    texts = []
    for i in range(n):
        rng = item_rng(seed, "corpus", i)
        scene, target = sample_scene(rng, ambiguous=i % 2 == 0)
        texts += [question(target, rng), gold_answer(scene, target, rng), warm_start_reply(scene, target, rng)]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, default=2000, help="number of items, train + val")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of items in the val split")
    args = parser.parse_args(argv)
    try:
        paths = write_dataset(args.out, args.n, args.seed, args.val_fraction)
    except ValueError as e:
        parser.error(str(e))
    print(" ".join(f"{split}: {path}" for split, path in paths.items()))


if __name__ == "__main__":
    main()
