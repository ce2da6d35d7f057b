"""InternVL's dynamic-resolution tiling in pure PIL + numpy: the ground truth in tests, the baseline in benchmarks.

Follows InternVL's `dynamic_preprocess` + `build_transform`: pick the grid, `Image.resize` with BICUBIC to
(cols*tile, rows*tile), crop row-major, add a `resize((tile, tile))` thumbnail when there is more than one tile,
then ToTensor (/255) and Normalize, all in float32.
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from grpo_fast.vision.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TiledImage,
    candidate_grids,
    check_grid_args,
    check_norm,
    check_tile_args,
    tile_count,
    to_rgb,
)


def closest_grid(
    width: int, height: int, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12
) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to width/height; on a tie the later (larger) grid wins when the
    image area exceeds half the grid's pixel area. Sizes in pixels."""
    width, height, tile_size, min_tiles, max_tiles = check_grid_args(width, height, tile_size, min_tiles, max_tiles)
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tile(
    image: Image.Image | np.ndarray,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> TiledImage:
    """Tile one PIL image (any mode) or uint8 [H, W, 3] array -> float32 [n, 3, tile, tile] and (cols, rows)."""
    mean32, std32 = check_norm(mean, std)
    t, min_tiles, max_tiles, use_thumbnail = check_tile_args(tile_size, min_tiles, max_tiles, use_thumbnail)
    rgb = to_rgb(image)
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    cols, rows = closest_grid(img.width, img.height, t, min_tiles, max_tiles)
    n = tile_count((cols, rows), t, use_thumbnail)
    resized = img.resize((cols * t, rows * t), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
    if n > len(tiles):
        tiles.append(img.resize((t, t), Image.Resampling.BICUBIC))
    pixels = np.stack([np.asarray(tile) for tile in tiles]).astype(np.float32) / np.float32(255)  # [n, t, t, 3]
    pixels = (pixels - mean32) / std32
    return TiledImage(torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))), (cols, rows))


def dynamic_tile_batch(
    images: Sequence[Image.Image | np.ndarray],
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> list[TiledImage]:
    """`dynamic_tile` over each image in turn (the reference is serial)."""
    return [dynamic_tile(im, tile_size, min_tiles, max_tiles, use_thumbnail, mean, std) for im in images]
