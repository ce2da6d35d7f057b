"""The tiler's kernel paths (scalar, AVX2, AVX-512): the same bytes and floats on each, pinned by digests of the
outputs, and the hook that picks a path."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from grpo_fast.vision import dynamic_tile, dynamic_tile_batch, tiling
from grpo_fast.vision.tiling import allow_simd, isa, pillow_resize, supported_isas

SIMD_ISAS = ["avx2", "avx512"]


def pattern(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Noise from an integer hash (no RNG whose stream could change between numpy versions)."""
    i = np.arange(height * width * channels, dtype=np.uint64) + np.uint64(seed * 7919)
    v = (i * np.uint64(2654435761) + np.uint64(seed)) % np.uint64(1 << 32)
    v = (v ^ (v >> np.uint64(15))) * np.uint64(2246822519) % np.uint64(1 << 32)
    return ((v >> np.uint64(13)) & np.uint64(255)).astype(np.uint8).reshape(height, width, channels)


def rgb(height: int, width: int, pixel_bytes: int, seed: int) -> np.ndarray:
    """[H, W, 3] noise whose pixels are 3 or 4 bytes apart (the RGB of an RGBA array)."""
    return pattern(height, width, pixel_bytes, seed)[..., :3]


# (height, width, tile_size, max_tiles): canvases up and down, thin images, one pass order or both, odd widths.
TILE_CASES = [
    (480, 640, 64, 12),
    (1080, 1920, 112, 12),
    (300, 37, 33, 6),
    (37, 300, 31, 6),
    (1000, 90, 40, 4),
    (90, 1000, 17, 8),
    (61, 61, 65, 4),
    (1, 1, 5, 2),
    (3, 700, 29, 3),
    (700, 3, 29, 3),
    (129, 257, 127, 6),
]
NORMS = [
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ((0.5, -3, 7), (0.1, 2, -9)),
]
# (width, height) in -> out of plain resizes: every width mod 16 around the kernels' block sizes, up and down.
RESIZE_CASES = [
    (w, h, w_out, h_out)
    for w in (1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 100)
    for h, w_out, h_out in ((13, 40, 5), (100, 17, 99), (9, 64, 200), (250, 3, 31))
]


def outputs():
    """Every output of the cases, in order: tiles (float32 bytes) and resized images (uint8)."""
    for h, w, tile, max_tiles in TILE_CASES:
        for pixel_bytes in (3, 4):
            image = rgb(h, w, pixel_bytes, h * 131 + w + pixel_bytes)
            for mean, std in NORMS:
                for thumbnail in (True, False):
                    yield dynamic_tile(image, tile, 1, max_tiles, thumbnail, mean, std, num_threads=1).pixel_values
    for w, h, w_out, h_out in RESIZE_CASES:
        for pixel_bytes in (3, 4):
            image = rgb(h, w, pixel_bytes, w * 1000 + h)
            yield torch.from_numpy(pillow_resize(image, w_out, h_out))
            yield torch.from_numpy(pillow_resize(image, 3 * w + 1, 2 * h + 1))
    image = Image.frombytes("RGBA", (170, 230), pattern(230, 170, 4, 5).tobytes())  # read in bands (small blocks)
    yield dynamic_tile(image, 48, 1, 6, True, (0.5, 0.25, 0.75), (0.5, 2.0, 0.1), num_threads=2).pixel_values
    for w_out, h_out in ((171, 90), (64, 190), (301, 400), (40, 20)):
        yield torch.from_numpy(pillow_resize(image, w_out, h_out))


def digest() -> str:
    sha = hashlib.sha256()
    for out in outputs():
        sha.update(out.numpy().tobytes())
    return sha.hexdigest()


# The digests of the outputs above with the scalar kernels as they were before the SIMD paths changed, one per pass
# order (`vertical_first_rule`: Pillow >= 13 vs older Pillow).
DIGESTS = {
    True: "897523c72b232c6af2fbcc1195068c04195ca55e9395983a6620872496f575f4",
    False: "8785d4d31656ac03a6fb7db3771a1cbb062eaf604d4467cb6af998eb262597b3",
}


@pytest.fixture(params=["scalar", *SIMD_ISAS])
def level(request):
    """Runs a test on each kernel path, skipping those this CPU or OS lacks."""
    if request.param not in supported_isas():
        pytest.skip(f"this CPU or OS has no {request.param} (cpuid / xgetbv)")
    allow_simd(request.param)
    yield request.param
    allow_simd(True)


@pytest.fixture
def small_pillow_blocks():
    """Pillow allocates the band case's image in 16 KiB blocks, so that it spans several."""
    size = Image.core.get_block_size()
    Image.core.set_block_size(1 << 14)
    yield
    Image.core.set_block_size(size)


@pytest.mark.parametrize("rule", [True, False], ids=["pillow13-order", "horizontal-first"])
def test_outputs_match_digests_on_every_path(level, rule, small_pillow_blocks, monkeypatch):
    monkeypatch.setattr(tiling, "vertical_first_rule", lambda: rule)
    assert isa() == level
    assert digest() == DIGESTS[rule]


@pytest.mark.parametrize("simd", SIMD_ISAS)
def test_simd_paths_equal_scalar_on_random_inputs(simd):
    # Random sizes, both pixel strides, tile sizes and norms: every width mod 64 and every tap count the kernels see.
    if simd not in supported_isas():
        pytest.skip(f"this CPU or OS has no {simd} (cpuid / xgetbv)")
    rng = np.random.default_rng(11)
    cases = []
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        image = rng.integers(0, 256, (h, w, int(rng.choice([3, 4]))), dtype=np.uint8)[..., :3]
        tile, max_tiles = int(rng.integers(1, 80)), int(rng.integers(1, 13))
        mean, std = rng.uniform(-2, 2, 3).tolist(), (rng.uniform(0.01, 3, 3) * rng.choice([-1, 1], 3)).tolist()
        cases.append((image, {"tile_size": tile, "max_tiles": max_tiles, "mean": mean, "std": std}))
    sizes = [tuple(int(v) for v in rng.integers(1, 300, 2)) for _ in range(60)]
    results = {}
    for level in ("scalar", simd):
        allow_simd(level)
        try:
            results[level] = (
                [dynamic_tile(image, **kwargs, num_threads=2).pixel_values for image, kwargs in cases],
                [pillow_resize(image, *size) for (image, _), size in zip(cases, sizes, strict=True)],
            )
        finally:
            allow_simd(True)
    for got, want in zip(results[simd][0], results["scalar"][0], strict=True):
        assert np.array_equal(got.numpy().view(np.uint32), want.numpy().view(np.uint32))
    for got, want in zip(results[simd][1], results["scalar"][1], strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize(
    "std",
    [(1.4e-45, 1.0, 1.0), (3e38, 1e-30, 7.0)],
    ids=["denormal-std", "huge-and-tiny-std"],  # 1 / std overflows (AVX-512's quotient would be NaN); denormals
)
def test_normalize_is_exact_division_for_extreme_std(level, std):
    image = pattern(40, 60, 3, 2)
    got = dynamic_tile(image, tile_size=16, mean=(0.25, 0.5, -0.75), std=std).pixel_values
    allow_simd("scalar")
    want = dynamic_tile(image, tile_size=16, mean=(0.25, 0.5, -0.75), std=std).pixel_values
    assert np.array_equal(got.numpy().view(np.uint32), want.numpy().view(np.uint32))


def test_batches_on_threads_equal_scalar(level):
    images = [pattern(70 + 37 * i, 300 - 23 * i, 3, i) for i in range(6)]
    got = dynamic_tile_batch(images, tile_size=48, num_threads=3)
    allow_simd("scalar")
    want = dynamic_tile_batch(images, tile_size=48, num_threads=1)
    for a, b in zip(got, want, strict=True):
        assert a.grid == b.grid and torch.equal(a.pixel_values, b.pixel_values)


def test_paths_and_the_hook():
    supported = supported_isas()
    assert supported[0] == "scalar" and list(supported) == ["scalar", *SIMD_ISAS][: len(supported)]
    assert isa() == supported[-1]  # the default: the widest
    try:
        allow_simd(False)
        assert isa() == "scalar"
        allow_simd(supported[-1])
        assert isa() == supported[-1]
        with pytest.raises(ValueError, match="level must be"):
            allow_simd("avx1024")
        for missing in [level for level in SIMD_ISAS if level not in supported]:
            with pytest.raises(ValueError, match=f"support .*got '{missing}'"):
                allow_simd(missing)
    finally:
        allow_simd(True)
    assert isa() == supported[-1]
