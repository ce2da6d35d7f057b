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
# Bounds that turn a mistyped argument into an error instead of a hang or an out-of-memory kill: the grid search
# visits every (cols, rows) with cols * rows <= max_tiles, and one image's pixel_values takes n * 3 * tile_size**2 * 4
# bytes (12 tiles + thumbnail of 448 px: 30 MiB).
TILES_LIMIT = 1024
TILE_SIZE_LIMIT = 16384  # one tile: 3 GiB of float32
MAX_OUTPUT_BYTES = 1 << 32


class TiledImage(NamedTuple):
    """One image cut into tiles.

    pixel_values: float32 [n, 3, tile, tile]: the `cols * rows` tiles row-major, then the thumbnail if any.
    grid: (cols, rows) of the tile grid.
    """

    pixel_values: torch.Tensor
    grid: tuple[int, int]


def _as_ints(**values: object) -> list[int]:
    """The values as Python ints (numpy integers converted); TypeError naming the first that is not an integer."""
    ints = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        ints.append(int(value))
    return ints


def check_tile_args(tile_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool) -> tuple[int, int, int, bool]:
    """The tiling arguments as Python ints and a bool; TypeError or ValueError naming the argument unless usable."""
    tile_size, min_tiles, max_tiles = _as_ints(tile_size=tile_size, min_tiles=min_tiles, max_tiles=max_tiles)
    if not 1 <= tile_size <= TILE_SIZE_LIMIT:
        raise ValueError(f"tile_size must be in [1, {TILE_SIZE_LIMIT}], got {tile_size}")
    if min_tiles < 1:
        raise ValueError(f"min_tiles must be >= 1, got {min_tiles}")
    if min_tiles > max_tiles:
        raise ValueError(f"min_tiles ({min_tiles}) must be <= max_tiles ({max_tiles})")
    if max_tiles > TILES_LIMIT:
        raise ValueError(f"max_tiles must be <= {TILES_LIMIT}, got {max_tiles}")
    if not isinstance(use_thumbnail, bool | np.bool_):
        raise TypeError(f"use_thumbnail must be a bool, got {type(use_thumbnail).__name__}")
    return tile_size, min_tiles, max_tiles, bool(use_thumbnail)


def check_grid_args(
    width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int
) -> tuple[int, int, int, int, int]:
    """The image size (px) and the tiling bounds as Python ints; TypeError or ValueError naming the argument unless
    they are usable."""
    width, height = _as_ints(width=width, height=height)
    if width < 1 or height < 1:
        raise ValueError(f"image has zero size: {width}x{height} (width x height)")
    tile_size, min_tiles, max_tiles, _ = check_tile_args(tile_size, min_tiles, max_tiles, True)
    return width, height, tile_size, min_tiles, max_tiles


def tile_count(grid: tuple[int, int], tile_size: int, use_thumbnail: bool) -> int:
    """Tiles in one image's pixel_values: cols * rows, +1 thumbnail when asked for and there is more than one.
    ValueError when they would take more than MAX_OUTPUT_BYTES."""
    cols, rows = grid
    n = cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)
    size = n * 3 * tile_size * tile_size * 4
    if size > MAX_OUTPUT_BYTES:
        raise ValueError(
            f"{n} tiles of tile_size {tile_size} (grid {cols}x{rows} within max_tiles) would take "
            f"{size / 2**30:.1f} GiB, more than {MAX_OUTPUT_BYTES >> 30} GiB: lower tile_size or max_tiles"
        )
    return n


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


def decode(image: Image.Image) -> None:
    """Decode a lazily opened file's pixels now. A truncated or corrupt file raises OSError (PIL's own; the
    SyntaxError PIL raises for a broken file becomes one) or ValueError (too little pixel data, an unknown mode)."""
    try:
        image.load()
    except SyntaxError as err:  # what PIL raises inside a plugin for a broken file (a bad PNG chunk): not Python's
        raise OSError(f"image file is broken: {err}") from err
    except ValueError as err:
        raise ValueError(f"image could not be decoded: {err}") from err


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """A PIL image decoded (`decode`) and converted to RGB as InternVL does (`.convert("RGB")`), or a checked uint8
    [H, W, 3] array."""
    if isinstance(image, np.ndarray):
        check_rgb_array(image)
        return image
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image or a uint8 numpy array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size: {image.width}x{image.height} (width x height)")
    decode(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:  # a mode Pillow cannot convert (La)
        raise ValueError(f"image mode {image.mode!r} cannot be converted to RGB: {err}") from err


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
