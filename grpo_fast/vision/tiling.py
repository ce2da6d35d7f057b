"""InternVL dynamic-resolution tiling over the C++ extension `grpo_fast._tiling` (which also holds the CPU row ops
of `grpo_fast.kernels.rowwise_torch`; `isa` and `allow_simd` here pick the kernel path of both).

The extension resamples exactly as the installed Pillow's 8-bit BICUBIC `Image.resize` (fixed-point
coefficients, uint8 rounding between the passes, Pillow's pass order) and writes the normalized float32 tiles
straight into the output tensor, on native threads with the GIL released.
"""

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

from grpo_fast.native import _tiling
from grpo_fast.vision.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TiledImage,
    check_grid_args,
    check_norm,
    check_tile_args,
    decode,
    tile_count,
    to_rgb,
)


def closest_grid(
    width: int, height: int, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12
) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to width/height among min_tiles <= cols*rows <= max_tiles; on a tie
    the larger grid wins when the image area exceeds half the grid's pixel area. Sizes in pixels."""
    return _tiling.closest_grid(*check_grid_args(width, height, tile_size, min_tiles, max_tiles))


@lru_cache(maxsize=1)
def vertical_first_rule() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks much more than the width
    (Pillow >= 13) or always starts horizontal (older Pillow): probed once on a small noise image."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 24, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(noise).resize((20, 8), Image.Resampling.BICUBIC))
    for rule in (True, False):
        if np.array_equal(_tiling.resize(noise, 20, 8, rule), expected):
            return rule
    raise RuntimeError(f"the installed Pillow ({Image.__version__}) resamples in a way grpo_fast does not know")


def pillow_resize(image: Image.Image | np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: the C++ resampler alone, equal to `image.convert("RGB").resize((width, height),
    Image.Resampling.BICUBIC)` of the installed Pillow."""
    return _tiling.resize(_pixels(image), int(width), int(height), vertical_first_rule())


Isa = Literal["scalar", "avx2", "avx512"]


def supported_isas() -> tuple[Isa, ...]:
    """The kernel paths this CPU and OS can run, narrowest first: "scalar", then "avx2", then "avx512" (AVX-512
    F/BW/VL with the OS saving zmm state)."""
    return tuple(_tiling.supported_isas())


def isa() -> Isa:
    """The kernel path later calls run: the widest supported one unless `allow_simd` narrowed it."""
    return _tiling.isa()


def allow_simd(level: bool | Isa = True) -> None:
    """Testing hook: which kernels later calls run, on every thread. True: the widest this CPU supports (the
    default); False: the portable scalar ones; "scalar", "avx2" or "avx512": that path, ValueError unless it is in
    `supported_isas()`. Every path gives the same bytes and floats."""
    if level is True or level is False:
        _tiling.set_isa(supported_isas()[-1] if level else "scalar")
    elif level in get_args(Isa):
        _tiling.set_isa(level)
    else:
        raise ValueError(f"level must be True, False or one of {get_args(Isa)}, got {level!r}")


# Pillow stores these modes as 4 bytes per pixel, R, G, B first; their RGB is what `.convert("RGB")` gives.
_FOUR_BYTE_RGB_MODES = ("RGB", "RGBA", "RGBX")


def _pillow_view(image: Image.Image) -> np.ndarray | None:
    """Read-only uint8 [H, W, 3] view (strides [4W, 4, 1]) of Pillow's own pixels through its Arrow export
    (Pillow >= 11.2), or None for an image held in several memory blocks."""
    try:
        schema, exported = image.__arrow_c_array__()
    except ValueError:
        return None
    return _tiling.pillow_rgb_view(schema, exported, image.width, image.height)


def _pixels(image: Image.Image | np.ndarray) -> list[np.ndarray]:
    """The image's RGB pixels as row bands, top to bottom, of uint8 [h, W, 3] arrays whose pixels are 3 or 4 bytes
    apart and channels 1 (row stride free). No copy for such numpy arrays (an RGBA array's `[..., :3]` too) nor for
    Pillow images: one view of a single memory block through Pillow's Arrow export, or one view per block of an
    image too large for one (16 MiB by default, e.g. 4000x3000). Should Pillow's image struct not check out, such an
    image is cropped into bands that each fit one block (a memcpy per row)."""
    arrow = hasattr(Image.Image, "__arrow_c_array__")  # Pillow >= 11.2; older ones take the copy below
    if arrow and isinstance(image, Image.Image) and image.mode in _FOUR_BYTE_RGB_MODES and image.width and image.height:
        decode(image)  # first: a decoding error must not pass for the ValueError of an image in several blocks
        whole = _pillow_view(image)
        if whole is not None:
            return [whole]
        bands = 3 if image.mode == "RGB" else 4
        blocks = _tiling.pillow_block_views(image.getim(), image.im, image.width, image.height, bands)
        if blocks is not None:
            return blocks
        band_rows = max(1, Image.core.get_block_size() // (4 * image.width))
        boxes = [(0, y, image.width, min(y + band_rows, image.height)) for y in range(0, image.height, band_rows)]
        crops = [_pillow_view(image.crop(box)) for box in boxes]
        if all(crop is not None for crop in crops):
            return crops
    array = np.asarray(to_rgb(image))
    if array.strides[2] != 1 or (array.shape[1] > 1 and array.strides[1] not in (3, 4)):
        array = np.ascontiguousarray(array)
    return [array]


def _prepare(
    image: Image.Image | np.ndarray, tile_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool
) -> tuple[list[np.ndarray], tuple[int, int], torch.Tensor]:
    """Input row bands, grid and the empty float32 [n, 3, tile, tile] output for one image (arguments checked)."""
    bands = _pixels(image)
    width, height = bands[0].shape[1], sum(band.shape[0] for band in bands)
    grid = _tiling.closest_grid(width, height, tile_size, min_tiles, max_tiles)
    n = tile_count(grid, tile_size, use_thumbnail)
    return bands, grid, torch.empty((n, 3, tile_size, tile_size), dtype=torch.float32)


def _num_threads(num_threads: int | None) -> int:
    if num_threads is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or not 1 <= num_threads < 2**31:
        raise ValueError(f"num_threads must be an int in [1, 2**31) or None, got {num_threads!r}")
    return num_threads


def dynamic_tile_batch(
    images: Sequence[Image.Image | np.ndarray],
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_threads: int | None = None,
) -> list[TiledImage]:
    """Tile many images at once: the tiles of all images share one pool of `num_threads` native threads
    (None: every core this process may use). Each result is as `dynamic_tile`'s."""
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim < 4):
        raise TypeError(f"images must be a sequence of images, got one {type(images).__name__}: call dynamic_tile")
    mean32, std32 = check_norm(mean, std)
    tile_size, min_tiles, max_tiles, use_thumbnail = check_tile_args(tile_size, min_tiles, max_tiles, use_thumbnail)
    threads = _num_threads(num_threads)
    prepared = [_prepare(im, tile_size, min_tiles, max_tiles, use_thumbnail) for im in images]
    _tiling.tile_batch(
        [p[0] for p in prepared],
        [p[1] for p in prepared],
        [p[2].numpy() for p in prepared],
        tile_size,
        mean32,
        std32,
        vertical_first_rule(),
        threads,
    )
    return [TiledImage(out, grid) for _, grid, out in prepared]


def dynamic_tile(
    image: Image.Image | np.ndarray,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_threads: int | None = None,
) -> TiledImage:
    """Tile one PIL image (any mode, converted to RGB) or uint8 [H, W, 3] array (any strides).

    Returns float32 `pixel_values [cols*rows (+1 thumbnail), 3, tile, tile]`, `(x/255 - mean) / std`, and the grid.
    """
    return dynamic_tile_batch([image], tile_size, min_tiles, max_tiles, use_thumbnail, mean, std, num_threads)[0]
