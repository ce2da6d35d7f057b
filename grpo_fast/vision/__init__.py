"""InternVL dynamic-resolution image tiling (C++ extension); `grpo_fast.vision.reference` is the PIL + numpy twin."""

from grpo_fast.vision.common import IMAGENET_MEAN, IMAGENET_STD, TiledImage
from grpo_fast.vision.tiling import closest_grid, dynamic_tile, dynamic_tile_batch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TiledImage", "closest_grid", "dynamic_tile", "dynamic_tile_batch"]
