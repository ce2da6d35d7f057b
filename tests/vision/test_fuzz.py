"""Fuzzing the tiler with hypothesis: every input either tiles as the PIL + numpy reference does or raises a
TypeError/ValueError naming the bad argument (PIL's OSError for an undecodable file); never a crash, a hang or
silent garbage.

Deterministic (derandomized, no example database), ~40 s; `make asan` runs it under AddressSanitizer + UBSan.
"""

import io
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from grpo_fast.vision import closest_grid, dynamic_tile, dynamic_tile_batch
from grpo_fast.vision import reference as ref
from grpo_fast.vision.common import MAX_OUTPUT_BYTES, TILE_SIZE_LIMIT, TILES_LIMIT

LEVEL = 1 / 255  # the contract: within one uint8 level of the reference before normalization
RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # pixel_values == uint8 / 255
# The deadline only flags a slow example after it returns (a quadratic search, a thread storm), it cannot end a hang.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Per case of a parametrized test (a view, a mode, a file format): its share of the ~40 s.
FUZZ_EACH = settings(FUZZ, max_examples=25)
PIL_MODES = sorted(Image.MODES)  # 1, CMYK, F, HSV, I, I;16 (L, B, N), L, LA, LAB, La, P, PA, RGB, RGBA, RGBX, ...


def noise(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# Image sizes (height, width): the 1-pixel-thin extremes up to 20000 long, and small ones of any aspect.
LONG_SIDE = st.sampled_from([1, 2, 8, 9, 19999, 20000]) | st.integers(1, 20000)
SIZES = st.one_of(
    st.tuples(LONG_SIDE, st.just(1)),
    st.tuples(st.just(1), LONG_SIDE),
    st.tuples(st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.integers(1, 200), st.integers(1, 200)),
)
# Tiling bounds: the usual ones, and extremes with tiny tiles (a grid of up to TILES_LIMIT tiles stays small).
TILE_ARGS = st.one_of(
    st.builds(
        lambda tile, lo, extra: {"tile_size": tile, "min_tiles": lo, "max_tiles": lo + extra},
        st.sampled_from([1, 2, 3, 7, 16, 31, 64]),
        st.integers(1, 12),
        st.integers(0, 12),
    ),
    st.builds(
        lambda tile, lo, hi: {"tile_size": tile, "min_tiles": min(lo, hi), "max_tiles": max(lo, hi)},
        st.integers(1, 4),
        st.sampled_from([1, 2, 97, TILES_LIMIT]),
        st.sampled_from([1, 13, 256, TILES_LIMIT]),
    ),
    st.builds(dict, tile_size=st.sampled_from([224, 448]), max_tiles=st.integers(1, 6)),
)

# numpy views of a uint8 buffer: each gives an [H, W, 3] array (or not, for the wrong-dtype/shape ones).
VIEWS = {
    "contiguous": lambda h, w, s: noise(h, w, 3, s),
    "flipped rows": lambda h, w, s: noise(h, w, 3, s)[::-1],
    "flipped columns": lambda h, w, s: noise(h, w, 3, s)[:, ::-1],
    "bgr": lambda h, w, s: noise(h, w, 3, s)[..., ::-1],
    "every other row and column": lambda h, w, s: noise(2 * h, 2 * w, 3, s)[::2, ::2],
    "fortran": lambda h, w, s: np.asfortranarray(noise(h, w, 3, s)),
    "transposed": lambda h, w, s: noise(w, h, 3, s).transpose(1, 0, 2),
    "rgb of rgba": lambda h, w, s: noise(h, w, 4, s)[..., :3],
    "gba of rgba": lambda h, w, s: noise(h, w, 4, s)[..., 1:],  # its last pixel ends at the buffer's last byte
    "padded rows": lambda h, w, s: noise(h, w + 3, 3, s)[:, 1 : w + 1],
    "broadcast row": lambda h, w, s: np.broadcast_to(noise(1, w, 3, s), (h, w, 3)),
    "overlapping rows": lambda h, w, s: np.lib.stride_tricks.as_strided(
        noise(1, w + h, 3, s), (h, w, 3), (3, 3, 1), writeable=False
    ),
}
BAD_ARRAYS = {
    "float32": (lambda h, w, s: noise(h, w, 3, s).astype(np.float32), "uint8"),
    "int16": (lambda h, w, s: noise(h, w, 3, s).astype(np.int16), "uint8"),
    "bool": (lambda h, w, s: noise(h, w, 3, s) > 127, "uint8"),
    "big-endian uint16": (lambda h, w, s: noise(h, w, 3, s).astype(">u2"), "uint8"),
    "gray": (lambda h, w, s: noise(h, w, 1, s)[..., 0], "shape"),
    "one channel": (lambda h, w, s: noise(h, w, 1, s), "shape"),
    "rgba": (lambda h, w, s: noise(h, w, 4, s), "shape"),
    "two channels": (lambda h, w, s: noise(h, w, 2, s), "shape"),
    "batch": (lambda h, w, s: noise(h, w, 3, s)[None], "shape"),
    "empty rows": (lambda h, w, s: noise(h, w, 3, s)[:0], "zero size"),
    "empty columns": (lambda h, w, s: noise(h, w, 3, s)[:, :0], "zero size"),
}


def assert_tiles_like_reference(image, **kwargs) -> None:
    """The C++ tiler's raw tiles within one level of the reference's; the grid and the shape exact."""
    got, want = dynamic_tile(image, **kwargs, **RAW), ref.dynamic_tile(image, **kwargs, **RAW)
    assert got.grid == want.grid
    assert got.pixel_values.shape == want.pixel_values.shape and got.pixel_values.dtype == torch.float32
    torch.testing.assert_close(got.pixel_values, want.pixel_values, atol=LEVEL + 1e-6, rtol=0)


def assert_names_argument(err: BaseException, name: str) -> None:
    assert isinstance(err, TypeError | ValueError), repr(err)
    assert name in str(err), f"{name!r} not in {str(err)!r}"


@pytest.mark.parametrize("view", sorted(VIEWS))
@FUZZ_EACH
@given(size=SIZES, seed=st.integers(0, 2**16), tiling=TILE_ARGS)
def test_arrays_tile_like_reference(view, size, seed, tiling):
    assert_tiles_like_reference(VIEWS[view](*size, seed), **tiling)


@pytest.mark.parametrize("bad", sorted(BAD_ARRAYS))
@settings(FUZZ, max_examples=10)
@given(size=SIZES, seed=st.integers(0, 2**8))
def test_wrong_arrays_are_refused(bad, size, seed):
    make, words = BAD_ARRAYS[bad]
    for fn in (dynamic_tile, ref.dynamic_tile):
        with pytest.raises(ValueError, match=words):
            fn(make(*size, seed), tile_size=8)


def pil_image(mode: str, height: int, width: int, seed: int) -> Image.Image:
    """Random bytes in `mode`'s own storage (any float for "F", any int32 for "I", a random palette for "P")."""
    probe = Image.new(mode, (1, 1))
    raw = np.random.default_rng(seed).integers(0, 256, len(probe.tobytes()) * width * height, dtype=np.uint8)
    image = Image.frombytes(mode, (width, height), raw.tobytes())
    if mode in ("P", "PA"):
        image.putpalette(np.random.default_rng(seed + 1).integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


@pytest.mark.parametrize("mode", PIL_MODES)
@FUZZ_EACH
@given(size=SIZES, seed=st.integers(0, 2**16), tiling=TILE_ARGS, small_blocks=st.booleans())
def test_pil_modes_tile_like_reference(mode, size, seed, tiling, small_blocks):
    block_size = Image.core.get_block_size()
    if small_blocks:  # images made now span several 4 KiB memory blocks: the tiler reads them in bands
        Image.core.set_block_size(4096)
    try:
        image = pil_image(mode, *size, seed)
    finally:
        Image.core.set_block_size(block_size)
    try:
        image.convert("RGB")
    except ValueError:  # Pillow cannot convert this mode (La): both refuse it, naming the image
        for fn in (dynamic_tile, ref.dynamic_tile):
            with pytest.raises(ValueError, match="image mode"):
                fn(image, **tiling)
        return
    assert_tiles_like_reference(image, **tiling)


@FUZZ
@given(
    images=st.lists(
        st.tuples(st.sampled_from(["array", "RGB", "RGBA", "L", "P"]), SIZES, st.integers(0, 2**16)), max_size=5
    ),
    num_threads=st.one_of(st.none(), st.integers(1, 40)),
    tile_size=st.sampled_from([1, 5, 32]),
    max_tiles=st.integers(1, 12),
    use_thumbnail=st.booleans(),
)
def test_batches_tile_like_reference(images, num_threads, tile_size, max_tiles, use_thumbnail):
    batch = [noise(h, w, 3, s) if kind == "array" else pil_image(kind, h, w, s) for kind, (h, w), s in images]
    kwargs = {"tile_size": tile_size, "max_tiles": max_tiles, "use_thumbnail": use_thumbnail, **RAW}
    got = dynamic_tile_batch(batch, num_threads=num_threads, **kwargs)
    assert len(got) == len(batch)
    for image, tiled in zip(batch, got, strict=True):
        want = ref.dynamic_tile(image, **kwargs)
        assert tiled.grid == want.grid and tiled.pixel_values.shape == want.pixel_values.shape
        torch.testing.assert_close(tiled.pixel_values, want.pixel_values, atol=LEVEL + 1e-6, rtol=0)


@FUZZ
@given(
    seed=st.integers(0, 2**16),
    mean=st.lists(st.floats(-10, 10), min_size=3, max_size=3),
    std=st.lists(st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3), min_size=3, max_size=3),
)
def test_normalization_is_exact_float32(seed, mean, std):
    # (v / 255 - mean) / std in float32, the reference's operations: bit for bit from the raw tiles.
    image = noise(37, 53, 3, seed)
    raw = dynamic_tile(image, tile_size=16, **RAW).pixel_values.numpy()
    levels = np.rint(raw * 255).astype(np.uint8).astype(np.float32) / np.float32(255)
    mean32, std32 = np.float32(mean)[:, None, None], np.float32(std)[:, None, None]
    got = dynamic_tile(image, tile_size=16, mean=mean, std=std).pixel_values.numpy()
    assert np.array_equal(got, (levels - mean32) / std32)


# One bad argument at a time: (keyword, value, the words its error must contain).
BAD_ARGUMENTS = [
    ("tile_size", 0, "tile_size"),
    ("tile_size", -448, "tile_size"),
    ("tile_size", 448.0, "tile_size"),
    ("tile_size", "448", "tile_size"),
    ("tile_size", True, "tile_size"),
    ("tile_size", None, "tile_size"),
    ("tile_size", 2**23, "tile_size"),
    ("tile_size", 2**63, "tile_size"),
    ("min_tiles", 0, "min_tiles"),
    ("min_tiles", -1, "min_tiles"),
    ("min_tiles", 13, "min_tiles"),  # > max_tiles = 12
    ("min_tiles", 1.5, "min_tiles"),
    ("max_tiles", 0, "max_tiles"),
    ("max_tiles", TILES_LIMIT + 1, "max_tiles"),
    ("max_tiles", 2**24 - 1, "max_tiles"),
    ("max_tiles", 10**30, "max_tiles"),
    ("max_tiles", np.float64(4), "max_tiles"),
    ("use_thumbnail", "no", "use_thumbnail"),
    ("use_thumbnail", None, "use_thumbnail"),
    ("mean", (0.5, 0.5), "mean"),
    ("mean", "abc", "mean"),
    ("mean", (0.5, float("inf"), 0.5), "mean"),
    ("mean", ((0.5,), (0.5,), (0.5,)), "mean"),
    ("std", (0.2, 0.0, 0.2), "std"),
    ("std", (0.2, float("nan"), 0.2), "std"),
    ("std", (1e-46, 1.0, 1.0), "std"),  # 0 in float32
    ("std", None, "std"),
    ("num_threads", 0, "num_threads"),
    ("num_threads", -3, "num_threads"),
    ("num_threads", 2.0, "num_threads"),
    ("num_threads", True, "num_threads"),
    ("num_threads", 2**31, "num_threads"),
]


@pytest.mark.parametrize("name, value, words", BAD_ARGUMENTS)
@pytest.mark.parametrize("fn", [dynamic_tile, dynamic_tile_batch], ids=["tile", "batch"])
def test_bad_arguments_raise_errors_naming_them(fn, name, value, words):
    image = noise(30, 40, 3, 0)
    with pytest.raises((TypeError, ValueError)) as err:
        fn(image if fn is dynamic_tile else [image], **{name: value})
    assert_names_argument(err.value, words)


@pytest.mark.parametrize("name, value, words", [a for a in BAD_ARGUMENTS if a[0] != "num_threads"])
def test_reference_refuses_the_same_arguments(name, value, words):
    with pytest.raises((TypeError, ValueError)) as err:
        ref.dynamic_tile(noise(30, 40, 3, 0), **{name: value})
    assert_names_argument(err.value, words)


@pytest.mark.parametrize("image", [None, [[[1, 2, 3]]], torch.zeros(4, 4, 3, dtype=torch.uint8), b"\x89PNG", 3])
def test_non_images_raise_type_error(image):
    for fn in (dynamic_tile, ref.dynamic_tile):
        with pytest.raises(TypeError, match="image must be"):
            fn(image)
    with pytest.raises(TypeError):
        dynamic_tile_batch(image)


@pytest.mark.parametrize("image", [Image.new("RGB", (4, 4)), noise(4, 4, 3, 0)], ids=["pil", "array"])
def test_batch_of_one_image_not_in_a_list_is_refused(image):
    with pytest.raises(TypeError, match="images must be a sequence of images"):
        dynamic_tile_batch(image)


@pytest.mark.parametrize("tile_size, max_tiles", [(TILE_SIZE_LIMIT, 2), (4096, 24), (1024, TILES_LIMIT)])
def test_outputs_beyond_the_memory_bound_are_refused(tile_size, max_tiles):
    image = noise(2, 2 * max_tiles, 3, 0)  # wide enough to take max_tiles tiles in one row
    for fn in (dynamic_tile, ref.dynamic_tile):
        with pytest.raises(ValueError, match=f"tile_size.*max_tiles.*more than {MAX_OUTPUT_BYTES >> 30} GiB"):
            fn(image, tile_size=tile_size, max_tiles=max_tiles, min_tiles=max_tiles)


@FUZZ
@given(
    width=st.integers(1, 2**31 - 1) | st.integers(1, 50),
    height=st.integers(1, 2**31 - 1) | st.integers(1, 50),
    tile_size=st.integers(1, 2**12),
    bounds=st.tuples(st.integers(1, TILES_LIMIT), st.integers(1, TILES_LIMIT)) | st.tuples(st.integers(1, 40)),
)
def test_grid_search_matches_reference(width, height, tile_size, bounds):
    lo, hi = min(bounds), max(bounds)
    assert closest_grid(width, height, tile_size, lo, hi) == ref.closest_grid(width, height, tile_size, lo, hi)


def encoded(fmt: str, image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


FORMATS = {
    "PNG": "RGB",
    "JPEG": "RGB",
    "BMP": "RGB",
    "GIF": "P",
    "TIFF": "RGB",
    "WEBP": "RGB",
    "PPM": "L",
    "TGA": "RGBA",
}


def damage(data: bytes, how: str, rng: np.random.Generator) -> bytes:
    if how == "truncate":
        return data[: int(rng.integers(0, len(data)))]
    out = bytearray(data)
    if how == "flip bytes":
        for i in rng.integers(0, len(out), int(rng.integers(1, 9))):
            out[i] = int(rng.integers(0, 256))
    else:  # a run of bytes overwritten, after the first 8 (magic numbers intact, so the plugin is chosen)
        start = int(rng.integers(min(8, len(out) - 1), len(out)))
        out[start : start + int(rng.integers(1, 64))] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()[
            : len(out[start : start + 64])
        ]
    return bytes(out)


def outcome(fn, data: bytes):
    """fn's tiles of the damaged file opened with PIL, or the exception it raised; None when PIL cannot open it."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - refused at open (not an image, bad header): no image reaches the tiler
        return None
    try:
        return fn(image, tile_size=16, max_tiles=4, **RAW)
    except (OSError, ValueError) as err:  # PIL's decoding errors, the tiler's own
        return err


@pytest.fixture(scope="module")
def damaged_file(tmp_path_factory):
    return tmp_path_factory.mktemp("damaged") / "image"


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on damaged TIFF tags
@pytest.mark.parametrize("how", ["truncate", "flip bytes", "overwrite run"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(FUZZ, max_examples=15)
@given(size=st.tuples(st.integers(1, 64), st.integers(1, 64)), seed=st.integers(0, 2**16))
def test_damaged_files_tile_like_reference_or_raise(damaged_file, fmt, how, size, seed):
    from grpo_fast.models.inputs import load_rgb  # the training data's loader (imports transformers: here only)

    rng = np.random.default_rng(seed)
    data = damage(encoded(fmt, pil_image(FORMATS[fmt], *size, seed)), how, rng)
    got, want = outcome(dynamic_tile, data), outcome(ref.dynamic_tile, data)
    damaged_file.write_bytes(data)
    try:
        loaded = dynamic_tile(load_rgb(str(damaged_file)), tile_size=16, max_tiles=4, **RAW)
    except Exception as err:  # noqa: BLE001 - at open (any of PIL's errors) or decoding (OSError, ValueError)
        loaded = err
    if isinstance(want, Exception) or want is None:
        assert type(got) is type(want), (got, want)
        assert isinstance(loaded, Exception), "the loader read a file PIL cannot decode"
        return
    for tiled in (got, loaded):
        assert not isinstance(tiled, Exception), tiled
        assert tiled.grid == want.grid
        torch.testing.assert_close(tiled.pixel_values, want.pixel_values, atol=LEVEL + 1e-6, rtol=0)
