"""dynamic_tile (C++) against the PIL + numpy reference: Pillow parity, layout, modes, strides, threads, bad input."""

import gc
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from grpo_fast.vision import IMAGENET_STD, dynamic_tile, dynamic_tile_batch, tiling
from grpo_fast.vision import reference as ref
from grpo_fast.vision.tiling import _pixels, allow_simd, pillow_resize, supported_isas

LEVEL = 1 / 255  # the contract: within one uint8 level of the reference before normalization
RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # pixel_values == uint8 / 255


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    rgb = [128 + 127 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def assert_close_to_reference(image, **kwargs):
    got, want = dynamic_tile(image, **kwargs, **RAW), ref.dynamic_tile(image, **kwargs, **RAW)
    assert got.grid == want.grid
    assert got.pixel_values.shape == want.pixel_values.shape and got.pixel_values.dtype == torch.float32
    torch.testing.assert_close(got.pixel_values, want.pixel_values, atol=LEVEL + 1e-6, rtol=0)
    return got


@pytest.mark.parametrize(
    "height, width, tile_size",
    [(480, 640, 448), (1080, 1920, 224), (37, 1000, 224), (1000, 37, 224), (1, 1, 448), (3, 700, 64), (611, 97, 97)],
)
@pytest.mark.parametrize("make", [noise, smooth])
def test_matches_reference(make, height, width, tile_size):
    assert_close_to_reference(make(height, width), tile_size=tile_size)


@pytest.mark.parametrize("use_thumbnail", [True, False])
def test_thumbnail_and_layout(use_thumbnail, kernels):
    image = noise(300, 500, seed=1)
    got = assert_close_to_reference(image, tile_size=64, max_tiles=6, use_thumbnail=use_thumbnail)
    cols, rows = got.grid
    assert got.pixel_values.shape == (cols * rows + use_thumbnail, 3, 64, 64)
    # Tiles are cut row-major from one resize; the thumbnail is the whole image resized to tile x tile.
    canvas = pillow_resize(image, cols * 64, rows * 64)
    tile = cols + 1  # second row, second column
    want = torch.from_numpy(canvas[64:128, 64:128].transpose(2, 0, 1) / np.float32(255))
    torch.testing.assert_close(got.pixel_values[tile], want, atol=0, rtol=0)
    if use_thumbnail:
        thumb = torch.from_numpy(pillow_resize(image, 64, 64).transpose(2, 0, 1) / np.float32(255))
        torch.testing.assert_close(got.pixel_values[-1], thumb, atol=0, rtol=0)


def test_single_tile_has_no_thumbnail():
    got = assert_close_to_reference(noise(100, 100), tile_size=32, max_tiles=1)
    assert got.grid == (1, 1) and got.pixel_values.shape == (1, 3, 32, 32)


def test_normalization_matches_reference():
    image = noise(200, 300, seed=2)
    got, want = dynamic_tile(image, tile_size=64), ref.dynamic_tile(image, tile_size=64)
    torch.testing.assert_close(got.pixel_values, want.pixel_values, atol=LEVEL / min(IMAGENET_STD) + 1e-6, rtol=0)
    assert got.pixel_values.min() < -1.5 and got.pixel_values.max() > 2.0  # normalized, not raw [0, 1]
    mean, std = (0.5, 0.25, 0.75), (0.5, 2.0, 0.1)
    got = dynamic_tile(image, tile_size=64, mean=mean, std=std)
    torch.testing.assert_close(got.pixel_values, ref.dynamic_tile(image, tile_size=64, mean=mean, std=std).pixel_values,
                               atol=LEVEL / 0.1 + 1e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize(
    "height, width, tile_size",
    [
        (300, 500, 64),  # 2 tile rows: bands of tile rows, each with its share of the thumbnail
        (90, 700, 64),  # 1 tile row, split into bands when there are more threads
        (160, 40, 64),  # canvas upscaled (horizontal first), thumbnail shrunk vertical first
        (3000, 100, 64),  # both vertical first: tile and thumbnail jobs
        (20, 30, 2),  # more bands asked for than canvas rows
    ],
)
def test_bands_and_pass_orders_for_any_thread_count(height, width, tile_size):
    image = noise(height, width, seed=8)
    assert_close_to_reference(image, tile_size=tile_size)
    serial = dynamic_tile(image, tile_size=tile_size, num_threads=1, **RAW)
    for num_threads in (2, 3, 7):
        got = dynamic_tile(image, tile_size=tile_size, num_threads=num_threads, **RAW)
        assert torch.equal(got.pixel_values, serial.pixel_values), num_threads


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def kernels(request):
    """Runs a test on each kernel path, skipping those this CPU or OS lacks."""
    if request.param not in supported_isas():
        pytest.skip(f"this CPU or OS has no {request.param} (cpuid / xgetbv)")
    allow_simd(request.param)
    yield request.param
    allow_simd(True)


@pytest.mark.parametrize(
    "norm",
    [
        {},
        RAW,
        {"mean": (0.5, 0.25, 0.75), "std": (0.5, 2.0, 0.1)},
        {"mean": (1e-3, 7.0, -3.0), "std": (3.0, 1e-3, 1e3)},
    ],
)
@pytest.mark.parametrize("simd", ["avx2", "avx512"])
def test_simd_kernels_equal_scalar_bit_for_bit(simd, norm):
    if simd not in supported_isas():
        pytest.skip(f"this CPU or OS has no {simd} (cpuid / xgetbv)")
    image = noise(150, 260, seed=9)
    try:
        allow_simd(simd)
        fast = dynamic_tile(image, tile_size=64, **norm).pixel_values
        allow_simd("scalar")
        scalar = dynamic_tile(image, tile_size=64, **norm).pixel_values
    finally:
        allow_simd(True)
    assert torch.equal(fast, scalar)


def test_resize_matches_installed_pillow(kernels):
    # Random sizes up and down on each axis cover both of Pillow's pass orders; noise makes an off-by-one visible.
    rng = np.random.default_rng(3)
    for _ in range(100):
        w_in, h_in, w_out, h_out = (int(v) for v in rng.integers(1, 160, 4))
        image = noise(h_in, w_in, seed=int(rng.integers(1 << 30)))
        want = np.asarray(Image.fromarray(image).resize((w_out, h_out), Image.Resampling.BICUBIC))
        got = pillow_resize(image, w_out, h_out)
        assert np.abs(got.astype(int) - want).max() <= 1, (w_in, h_in, w_out, h_out)


def pillow_four_byte(mode: str, height: int, width: int, seed: int) -> Image.Image:
    """A noise image in one of the modes Pillow stores as 4 bytes per pixel (the 4th byte noise too), in memory
    Pillow allocated (not numpy's)."""
    rgba = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba.convert(mode) if mode != "RGBA" else rgba.copy()


def test_resize_of_pillow_images_matches_installed_pillow(kernels):
    # PIL images reach the resampler as views of Pillow's own 4-byte pixels: both pass orders, every width mod 8.
    rng = np.random.default_rng(5)
    for i in range(60):
        w_in, h_in, w_out, h_out = (int(v) for v in rng.integers(1, 160, 4))
        image = pillow_four_byte(("RGB", "RGBA", "RGBX")[i % 3], h_in, w_in, seed=i)
        want = np.asarray(image.convert("RGB").resize((w_out, h_out), Image.Resampling.BICUBIC))
        assert np.array_equal(pillow_resize(image, w_out, h_out), want), (image.mode, w_in, h_in, w_out, h_out)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "RGBX"])
def test_pillow_pixels_are_viewed_without_a_copy(mode):
    image = pillow_four_byte(mode, 50, 70, seed=6)
    want = np.asarray(image.convert("RGB")).copy()
    (view,) = _pixels(image)
    assert view.strides == (4 * 70, 4, 1) and not view.flags.writeable  # Pillow's own storage, read-only
    del image
    gc.collect()
    assert np.array_equal(view, want)  # the view keeps the exported pixels alive


@pytest.fixture
def small_pillow_blocks():
    """Pillow allocates images made during the test in 64 KiB blocks, so that small images span several."""
    size = Image.core.get_block_size()
    Image.core.set_block_size(1 << 16)
    yield
    Image.core.set_block_size(size)


def test_pillow_image_in_several_blocks_is_read_in_place(small_pillow_blocks, kernels):
    image = pillow_four_byte("RGBA", 200, 300, seed=7)  # 240 KB: 4 blocks of 54 rows
    with pytest.raises(ValueError):
        image.__arrow_c_array__()  # what makes the tiler read it in bands
    bands = _pixels(image)
    assert [band.shape[0] for band in bands] == [54, 54, 54, 38] and all(b.strides[1] == 4 for b in bands)
    assert np.array_equal(np.concatenate(bands), np.asarray(image.convert("RGB")))
    image.putpixel((5, 60), (1, 2, 3, 4))  # the bands are views of Pillow's own blocks, not copies
    assert bands[1][6, 5].tolist() == [1, 2, 3] and not any(band.flags.writeable for band in bands)
    for w_out, h_out in [(170, 90), (64, 190), (301, 400), (40, 20)]:  # both pass orders, windows across bands
        want = np.asarray(image.convert("RGB").resize((w_out, h_out), Image.Resampling.BICUBIC))
        assert np.array_equal(pillow_resize(image, w_out, h_out), want), (w_out, h_out)
    assert_close_to_reference(image, tile_size=48, max_tiles=6)


def test_pillow_blocks_are_cropped_where_the_image_struct_does_not_check_out(small_pillow_blocks, monkeypatch):
    image = pillow_four_byte("RGB", 200, 300, seed=8)
    in_place = dynamic_tile(image, tile_size=48, max_tiles=6, **RAW).pixel_values
    monkeypatch.setattr(tiling._tiling, "pillow_block_views", lambda *args: None)
    bands = _pixels(image)
    assert [band.shape[0] for band in bands] == [54, 54, 54, 38]
    assert np.array_equal(np.concatenate(bands), np.asarray(image))
    assert torch.equal(dynamic_tile(image, tile_size=48, max_tiles=6, **RAW).pixel_values, in_place)
    image.putpixel((5, 60), (1, 2, 3))
    assert bands[1][6, 5].tolist() != [1, 2, 3]  # copies


def rgb_in_mode(mode: str) -> Image.Image:
    base = Image.fromarray(smooth(90, 130))
    if mode == "I;16":
        return base.convert("L").convert("I;16")
    if mode == "PA":
        return base.convert("P").convert("PA")
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "P", "PA", "RGB", "RGBA", "RGBX", "LA", "CMYK", "YCbCr", "I", "I;16", "F"])
def test_pil_modes(mode):
    image = rgb_in_mode(mode)
    assert image.mode == mode
    assert_close_to_reference(image, tile_size=48, max_tiles=4)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::-1],  # negative row stride (no copy)
        lambda a: a[5:90, 7:120],  # row stride wider than the row (no copy)
        lambda a: a[::2, ::3],  # pixel stride 9 (copied)
        lambda a: a[..., ::-1],  # BGR view, channel stride -1 (copied)
        lambda a: np.asfortranarray(a),
    ],
    ids=["flipped", "cropped", "strided", "bgr-view", "fortran"],
)
def test_non_contiguous_arrays(view):
    image = view(noise(120, 160, seed=4))
    got = assert_close_to_reference(image, tile_size=40, max_tiles=4)
    contiguous = dynamic_tile(np.ascontiguousarray(image), tile_size=40, max_tiles=4, **RAW)
    assert torch.equal(got.pixel_values, contiguous.pixel_values)


def test_rgb_of_an_rgba_array_is_read_without_a_copy():
    rgba = np.random.default_rng(10).integers(0, 256, (60, 70, 4), dtype=np.uint8)
    (pixels,) = _pixels(rgba[..., 1:])  # G, B, A: the last pixel's "4th byte" would lie past the buffer
    assert pixels.strides == (280, 4, 1) and np.shares_memory(pixels, rgba)
    assert_close_to_reference(rgba[..., 1:], tile_size=40, max_tiles=4)
    image = Image.fromarray(np.ascontiguousarray(rgba[..., 1:]))
    for w_out, h_out in [(171, 33), (33, 171), (9, 7)]:  # both pass orders, SIMD and scalar tails
        want = np.asarray(image.resize((w_out, h_out), Image.Resampling.BICUBIC))
        assert np.array_equal(pillow_resize(rgba[..., 1:], w_out, h_out), want)


def test_threads_give_serial_results():
    images = [noise(70 + 13 * i, 200 - 11 * i, seed=i) for i in range(6)] + [smooth(300, 40)]
    kwargs = {"tile_size": 32, "max_tiles": 6}
    serial = [dynamic_tile(im, **kwargs, num_threads=1) for im in images]
    for num_threads in (2, 3, None):
        for got, want in zip(dynamic_tile_batch(images, **kwargs, num_threads=num_threads), serial, strict=True):
            assert got.grid == want.grid and torch.equal(got.pixel_values, want.pixel_values)
    # Several Python threads calling at once (the GIL is released inside): same results as serial calls.
    results: dict[int, list] = {}

    def work(t: int) -> None:
        results[t] = [dynamic_tile(im, **kwargs, num_threads=2) for im in images]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in range(4):
        for got, want in zip(results[t], serial, strict=True):
            assert torch.equal(got.pixel_values, want.pixel_values)


THREAD_LIMIT_SCRIPT = """
import resource
import numpy as np
import torch
from grpo_fast.vision import dynamic_tile

image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
serial = dynamic_tile(image, tile_size=32, num_threads=1).pixel_values
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (200 << 20), resource.RLIM_INFINITY))  # room for ~20 thread stacks
print(torch.equal(dynamic_tile(image, tile_size=32, num_threads=200).pixel_values, serial))
"""


@pytest.mark.skipif(bool(os.environ.get("GRPO_FAST_TILING_SO")), reason="ASan reserves more address space than that")
def test_threads_that_cannot_start_leave_their_jobs_to_the_others():
    # 200 threads asked for, ~20 start: the others' jobs run on those, not std::terminate on a failed thread start.
    script = [sys.executable, "-c", THREAD_LIMIT_SCRIPT]
    run = subprocess.run(script, check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stdout + run.stderr


@pytest.mark.parametrize("fn", [dynamic_tile, ref.dynamic_tile], ids=["cpp", "reference"])
@pytest.mark.parametrize(
    "image, kwargs, match",
    [
        (np.zeros((0, 5, 3), np.uint8), {}, "zero size"),
        (Image.new("RGB", (0, 4)), {}, "zero size"),
        (np.zeros((5, 5, 3), np.float32), {}, "must be uint8"),
        (np.zeros((5, 5, 3), np.uint16), {}, "must be uint8"),
        (np.zeros((5, 5), np.uint8), {}, r"shape \[H, W, 3\]"),
        (np.zeros((5, 5, 4), np.uint8), {}, r"shape \[H, W, 3\]"),
        (np.zeros((5, 5, 3), np.uint8), {"min_tiles": 3, "max_tiles": 2}, "min_tiles"),
        (np.zeros((5, 5, 3), np.uint8), {"tile_size": 0}, "tile_size"),
        (np.zeros((5, 5, 3), np.uint8), {"std": (0.2, float("nan"), 0.2)}, "finite"),
        (np.zeros((5, 5, 3), np.uint8), {"std": (0.2, 0.0, 0.2)}, "non-zero"),
        (np.zeros((5, 5, 3), np.uint8), {"mean": (0.5, 0.5)}, "3 numbers"),
    ],
)
def test_bad_input(fn, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(image, **kwargs)


def test_bad_input_types_and_threads():
    with pytest.raises(TypeError, match="PIL.Image.Image or a uint8 numpy array"):
        dynamic_tile([[1, 2, 3]])
    with pytest.raises(ValueError, match="num_threads"):
        dynamic_tile(noise(10, 10), num_threads=0)


def test_truncated_file_raises_pil_error():
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buf, format="PNG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))
    with pytest.raises(OSError, match="truncated|broken|image file"):
        dynamic_tile(truncated)
