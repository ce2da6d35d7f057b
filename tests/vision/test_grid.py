"""closest_grid (C++) against the reference on many sizes, extreme aspect ratios, ties and all tile bounds."""

import itertools

import numpy as np
import pytest

from grpo_fast.vision import closest_grid
from grpo_fast.vision import reference as ref

SIZES = [(1, 1), (1, 3000), (3000, 1), (2, 1), (448, 448), (896, 448), (640, 480), (1920, 1080), (4000, 3000)]


def test_grid_matches_reference_on_random_sizes():
    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(3000)]
    for width, height in sizes:
        assert closest_grid(width, height) == ref.closest_grid(width, height), (width, height)


@pytest.mark.parametrize(
    "min_tiles, max_tiles", [(a, b) for a, b in itertools.product(range(1, 13), repeat=2) if a <= b]
)
def test_grid_matches_reference_for_every_tile_bound(min_tiles, max_tiles):
    rng = np.random.default_rng(min_tiles * 100 + max_tiles)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(40)]
    for tile in (448, 224, 37):
        for width, height in sizes:
            got = closest_grid(width, height, tile, min_tiles, max_tiles)
            assert got == ref.closest_grid(width, height, tile, min_tiles, max_tiles), (width, height, tile)
            assert min_tiles <= got[0] * got[1] <= max_tiles


def test_grid_ties():
    # 2:1 image: (2, 1) and (4, 2) match exactly ((6, 3) has 18 > 12 tiles). 200x100: area 20000 is not above
    # 0.5*448*448*8 = 802816, so (2, 1) stays; 1920x960: area 1843200 > 802816, so (4, 2) wins.
    assert ref.closest_grid(200, 100) == closest_grid(200, 100) == (2, 1)
    assert ref.closest_grid(1920, 960) == closest_grid(1920, 960) == (4, 2)
    # 5:4 with min_tiles = max_tiles = 2: (1, 2) and (2, 1) are both 0.75 away (exact in binary); the first in
    # cols-ascending order, (1, 2), stays for a small image; 2000x1600 (area 3.2e6 > 0.5*448*448*2) takes (2, 1).
    assert ref.closest_grid(5, 4, 448, 2, 2) == closest_grid(5, 4, 448, 2, 2) == (1, 2)
    assert ref.closest_grid(2000, 1600, 448, 2, 2) == closest_grid(2000, 1600, 448, 2, 2) == (2, 1)


@pytest.mark.parametrize("fn", [closest_grid, ref.closest_grid], ids=["cpp", "reference"])
@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 10), "zero size"),
        ((10, 0), "zero size"),
        ((10, 10, 0), "tile_size"),
        ((10, 10, 448, 5, 4), r"min_tiles \(5\) must be <= max_tiles \(4\)"),
        ((10, 10, 448, 0, 4), "min_tiles"),
    ],
)
def test_grid_bad_input(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
