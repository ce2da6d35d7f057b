"""Synthetic ambiguity data: PIL scenes of coloured shapes and colour questions about one kind of shape.

An item is unambiguous when exactly one object fits the question ("What colour is the triangle?" with one
triangle) and ambiguous when two or three do. Each line is in the seed format plus the ground truth the rule
judge checks: `target` (what the question refers to) and `scene` (every object with shape, colour, size and
position). Levels alternate within each split (balanced), and everything is a function of the seed. Canvases are
1 x 1, 2 x 1, 1 x 2 or 2 x 2 tiles of the tiny model's 64 px (so tiling gives 1, 2 or 4 tiles, plus the thumbnail),
and each object sits in its own 32-px cell of that grid: no tile edge cuts an object. On free positions over
96-192 px canvases, the tiny model's warm start and GRPO lifted the val reward less (docs/experiments.md).

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
TILE = 64  # the tiny model's tile side in pixels
CELL = TILE // 2  # one object per cell of a cell grid aligned with the tiles: no tile edge cuts an object
GRIDS = ((1, 1), (2, 1), (1, 2), (2, 2))  # canvas sizes in tiles (cols, rows): 1..4 tiles, several aspect ratios


def _cells(cols: int, rows: int) -> list[tuple[int, int]]:
    """(column, row) of every CELL-px cell of a `cols x rows`-tile canvas, row by row."""
    return [(cx, cy) for cy in range(rows * TILE // CELL) for cx in range(cols * TILE // CELL)]


def _place(rng: random.Random, cols: int, rows: int, specs: list[tuple[str, str, str]]) -> list[SceneObject]:
    """One (shape, colour, size) spec per random cell of a `cols x rows`-tile canvas, centred in it give or take a
    few pixels of jitter."""
    cells = rng.sample(_cells(cols, rows), len(specs))
    placed = []
    for (shape, colour, size), (cx, cy) in zip(specs, cells):
        slack = CELL // 2 - RADIUS[size] - 1
        x = cx * CELL + CELL // 2 + rng.randint(-slack, slack)
        y = cy * CELL + CELL // 2 + rng.randint(-slack, slack)
        placed.append(SceneObject(shape, colour, size, x, y))
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
    cols, rows = rng.choice([g for g in GRIDS if len(_cells(*g)) >= len(specs)])
    objects = _place(rng, cols, rows, specs)
    base = rng.randint(225, 250)
    background = (base + rng.randint(-5, 5), base + rng.randint(-5, 5), base + rng.randint(-5, 5))
    return Scene(cols * TILE, rows * TILE, background, tuple(objects)), target


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
