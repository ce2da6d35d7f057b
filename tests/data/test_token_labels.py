"""Token labels: each image token's object, by hand on a small scene and against the real tiler's pixels."""

import random

import pytest
import torch

from grpo_fast.data.scene import COLOURS, SHAPES, Scene, SceneObject, render
from grpo_fast.data.token_labels import token_labels
from grpo_fast.models import load_policy
from grpo_fast.vision import IMAGENET_MEAN, IMAGENET_STD


def test_a_big_square_in_the_left_tile_by_hand():
    # 128 x 64: a 2 x 1 grid plus the thumbnail; the square (radius 14) covers x, y in [34, 62]
    scene = Scene(128, 64, (240, 240, 240), (SceneObject("square", "blue", "big", 48, 48),))
    labels = token_labels(scene, (2, 1), 3, side=4).view(3, 4, 4, 4)
    square = torch.tensor([1 + SHAPES.index("square"), 1 + list(COLOURS).index("blue"), 1])
    # left tile: token centres at 8, 24, 40, 56 px on both axes, those at 40 and 56 on the square; no count on tiles
    assert (labels[0, 2:, 2:, :3] == square).all() and (labels[0, ..., 3] == 0).all()
    assert (labels[0, :2] == 0).all() and (labels[0, :, :2] == 0).all() and (labels[1] == 0).all()
    # thumbnail: token centres at x = 16, 48, 80, 112 and y = 8, 24, 40, 56 scene pixels; one square in the picture
    assert (labels[2, 2:, 1, :3] == square).all() and (labels[2, 2:, 1, 3] == 1).all()
    assert labels[2, ..., 0].gt(0).sum() == 2


def test_thumbnail_tokens_count_the_objects_of_their_shape():
    objects = [SceneObject("square", "blue", "big", 48, 48), SceneObject("circle", "red", "big", 80, 48)]
    objects += [SceneObject("square", c, "small", x, 80) for c, x in (("red", 48), ("green", 80))]
    scene = Scene(128, 128, (240, 240, 240), tuple(objects))
    labels = token_labels(scene, (2, 2), 5, side=4)
    thumbnail, tiles = labels[64:], labels[:64]
    square, circle = thumbnail[:, 0] == 1 + SHAPES.index("square"), thumbnail[:, 0] == 1 + SHAPES.index("circle")
    assert square.sum() == 3 and circle.sum() == 1
    assert (thumbnail[square, 3] == 3).all() and (thumbnail[circle, 3] == 1).all()
    assert (tiles[:, 3] == 0).all() and (tiles[:, 0] > 0).any()


def test_the_one_tile_of_a_one_by_one_grid_counts_too():
    # no thumbnail follows a single tile, so its own tokens carry the count
    objects = (SceneObject("circle", "red", "big", 16, 16), SceneObject("circle", "blue", "small", 48, 48))
    labels = token_labels(Scene(64, 64, (240, 240, 240), objects), (1, 1), 1, side=4)
    on_circle = labels[:, 0] == 1 + SHAPES.index("circle")
    assert on_circle.sum() >= 2 and (labels[on_circle, 3] == 2).all() and (labels[~on_circle, 3] == 0).all()


def test_labels_match_the_tilers_pixels():
    """Squares fill their bounding square, so a labelled token's centre pixel has its object's colour."""
    rng = random.Random(0)
    policy = load_policy("tiny")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for width, height in ((192, 96), (96, 192), (160, 160), (100, 64), (250, 120), (64, 110)):
        # two big squares (28 px), one in each half of the longer side, so they never overlap
        halves = (
            [(0, width // 2), (width // 2, width)] if width >= height else [(0, height // 2), (height // 2, height)]
        )
        objects = []
        for colour, (lo, hi) in zip(rng.sample(list(COLOURS), 2), halves):
            along, across = rng.randint(lo + 25, hi - 25), rng.randint(25, min(width, height) - 25)
            x, y = (along, across) if width >= height else (across, along)
            objects.append(SceneObject("square", colour, "big", x, y))
        scene = Scene(width, height, (240, 240, 240), tuple(objects))
        tiled = policy.tiling.tile(render(scene))
        labels = token_labels(scene, tiled.grid, len(tiled.pixel_values), side=4)
        rgb = (tiled.pixel_values * std + mean) * 255  # [n, 3, 64, 64]
        centres = rgb[:, :, 8::16, 8::16].permute(0, 2, 3, 1).reshape(-1, 3)  # [n * 16, 3], token order
        wanted = torch.tensor([COLOURS[list(COLOURS)[c - 1]] if c else (240, 240, 240) for c in labels[:, 1].tolist()])
        matches = (centres - wanted).abs().amax(dim=1) < 30
        # resampling blurs edges, so a centre a pixel or two from a square's edge may be a mix of both colours
        assert matches.float().mean() >= 0.9, (width, height, matches.float().mean())
        seen = set(labels[labels[:, 0] > 0, 1].tolist())  # both squares are seen, not all background
        assert seen == {1 + list(COLOURS).index(o.colour) for o in objects}, (width, height)


def test_num_tiles_must_fit_the_grid():
    scene = Scene(64, 64, (240, 240, 240), ())
    with pytest.raises(ValueError, match="num_tiles must be cols \\* rows"):
        token_labels(scene, (2, 2), 3, side=4)
