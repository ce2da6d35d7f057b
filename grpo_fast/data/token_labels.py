"""Per-image-token ground truth of a synthetic scene: which object lies under each image token of its tiles.

InternVL turns each tile into a square of `side x side` image tokens (row-major; 4 x 4 for the tiny model); the
tiler resizes the image to the (cols, rows) grid and cuts it row-major, then appends the whole image resized to
one tile (the thumbnail). A token's label is the object whose bounding square holds the token's centre, mapped
back to the scene's pixels, or background. These labels pretrain the tiny model's vision tower
(`grpo_fast.sft.vision`).
"""

from __future__ import annotations

import torch

from grpo_fast.data.scene import COLOURS, RADIUS, SHAPES, SIZES, Scene

MAX_COUNT = 3  # "same shape" counts above this are labelled MAX_COUNT
# Classes per attribute; 0 is background (no object under the token) and, for "count", also a tile token: only a
# tile that shows the whole picture (the thumbnail, or the one tile of a 1 x 1 grid) is asked how many objects share
# its object's shape.
NUM_CLASSES = {"shape": 1 + len(SHAPES), "colour": 1 + len(COLOURS), "size": 1 + len(SIZES), "count": 1 + MAX_COUNT}


def _label(scene: Scene, x: float, y: float, whole_picture: bool) -> tuple[int, int, int, int]:
    for o in scene.objects:
        r = RADIUS[o.size]
        if abs(x - o.x) <= r and abs(y - o.y) <= r:
            count = min(sum(other.shape == o.shape for other in scene.objects), MAX_COUNT) if whole_picture else 0
            return 1 + SHAPES.index(o.shape), 1 + list(COLOURS).index(o.colour), 1 + SIZES.index(o.size), count
    return 0, 0, 0, 0


def token_labels(scene: Scene, grid: tuple[int, int], num_tiles: int, side: int) -> torch.Tensor:
    """`[num_tiles * side^2, 4]` long labels of every image token: shape, colour, size (0 = background) and, on
    a tile showing the whole picture (the thumbnail, or the one tile of a 1 x 1 grid), how many objects have the
    shape of the token's object (0 = background or another tile's token).

    `grid` is the tiler's (cols, rows); `num_tiles` is `cols * rows`, plus one when a thumbnail follows.
    """
    cols, rows = grid
    if num_tiles not in (cols * rows, cols * rows + 1):
        raise ValueError(f"num_tiles must be cols * rows ({cols * rows}) or one more (thumbnail), got {num_tiles}")
    # (column, row, scene pixels per tile) of each tile; the thumbnail is one tile spanning the whole scene
    whole = num_tiles == 1  # a 1 x 1 grid: its only tile is the whole picture
    tiles = [(k % cols, k // cols, scene.width / cols, scene.height / rows, whole) for k in range(cols * rows)]
    if num_tiles > cols * rows:
        tiles.append((0, 0, float(scene.width), float(scene.height), True))
    labels = [
        _label(scene, (c + (j + 0.5) / side) * tile_w, (r + (i + 0.5) / side) * tile_h, thumbnail)
        for c, r, tile_w, tile_h, thumbnail in tiles
        for i in range(side)
        for j in range(side)
    ]
    return torch.tensor(labels, dtype=torch.long)
