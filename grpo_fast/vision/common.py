"""Types, constants and argument checks shared by the C++-backed tiler and its PIL + numpy reference."""

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

# torchvision's ImageNet statistics, as InternVL's `build_transform` uses them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class TiledImage(NamedTuple):
    """One image cut into tiles.

    pixel_values: float32 [n, 3, tile, tile]: the `cols * rows` tiles row-major, then the thumbnail if any.
    grid: (cols, rows) of the tile grid.
    """

    pixel_values: torch.Tensor
    grid: tuple[int, int]


def check_grid_args(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> None:
    """Raise ValueError unless the image size and the tiling bounds are usable."""
    for name, value in (
        ("width", width),
        ("height", height),
        ("tile_size", tile_size),
        ("min_tiles", min_tiles),
        ("max_tiles", max_tiles),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if width < 1 or height < 1:
        raise ValueError(f"image has zero size: {width}x{height} (width x height)")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if min_tiles < 1:
        raise ValueError(f"min_tiles must be >= 1, got {min_tiles}")
    if min_tiles > max_tiles:
        raise ValueError(f"min_tiles ({min_tiles}) must be <= max_tiles ({max_tiles})")


def check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-channel normalization constants; return them as float32 [3] arrays."""
    arrays = []
    for name, values in (("mean", mean), ("std", std)):
        try:
            arr = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be 3 numbers, got {values!r}") from err
        if arr.shape != (3,):
            raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite, got {values!r}")
        arrays.append(arr)
    if (arrays[1] == 0).any():
        raise ValueError(f"std must be non-zero, got {std!r}")
    return arrays[0], arrays[1]


def check_rgb_array(array: np.ndarray) -> None:
    """Raise ValueError unless `array` is a non-empty uint8 [H, W, 3] image."""
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array must have shape [H, W, 3], got {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size: {array.shape[1]}x{array.shape[0]} (width x height)")


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """A PIL image converted to RGB as InternVL does (`.convert("RGB")`), or a checked uint8 [H, W, 3] array.

    Decoding errors of a lazily opened file (truncated or not an image) surface here as PIL's own OSError.
    """
    if isinstance(image, np.ndarray):
        check_rgb_array(image)
        return image
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image or a uint8 numpy array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size: {image.width}x{image.height} (width x height)")
    return image if image.mode == "RGB" else image.convert("RGB")


@lru_cache(maxsize=256)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, by tile count, then cols ascending.

    InternVL sorts a set by tile count (its order inside one count is CPython's set order); this fixed order is
    the one transformers' GotOcr2 image processor uses, and it only matters on an exact tie inside one count.
    """
    grids = [
        (c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))
