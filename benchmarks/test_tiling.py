"""InternVL tiling per image (max 12 tiles + thumbnail, 448 px) at 640x480, 1920x1080 and 4000x3000, side by side:
the C++ tiler on 1 thread (with the AVX2 kernels, and with the widest path the CPU has) and on every core, the
PIL + numpy reference, transformers' GotOcr2 image processors (PIL backend; torchvision backend where torchvision is
installed), and the floor: allocating and writing the float32 output once. Then a batch of 16 1920x1080 images on
1 and 2 threads. The header (benchmarks/conftest.py) names the CPU and the ISA path.

Targets (1 thread): >= 10x the reference at each size, >= 3x the torchvision processor at 1920x1080; batch of 16:
>= 1.7x from 1 to 2 threads. Ratios land in `extra_info`; the shared CPU makes them noisy, so they are recorded, not asserted.

    pytest benchmarks/test_tiling.py --benchmark-only --benchmark-columns=min,median,rounds
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from grpo_fast.vision import dynamic_tile, dynamic_tile_batch
from grpo_fast.vision import reference as ref
from grpo_fast.vision.tiling import allow_simd, isa, supported_isas

SIZES = [(640, 480), (1920, 1080), (4000, 3000)]
# baselines first, so that the C++ rows can record their speedup over each of them
IMPLS = [
    "reference",
    "gotocr2-pil",
    "gotocr2-torchvision",
    "floor-output-write",
    "cpp-1-thread-avx2",  # the AVX2 kernels, beside the widest path this CPU has (the same on a CPU without AVX-512)
    "cpp-1-thread",
    "cpp-all-cores",
]
CORES = len(os.sched_getaffinity(0))
_min_s: dict[tuple[tuple[int, int], str], float] = {}  # best time per (size, impl), filled as cases run


def photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))


def got_ocr2(backend: str):
    """transformers' InternVL-family processor set up as InternVL tiles: 448 px, 1..12 patches + thumbnail."""
    kwargs = {"crop_to_patches": True, "min_patches": 1, "max_patches": 12, "size": {"height": 448, "width": 448}}
    if backend == "pil":
        module = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
        processor = module.GotOcr2ImageProcessorPil(**kwargs)
    else:
        pytest.importorskip("torchvision")
        from transformers import GotOcr2ImageProcessor

        processor = GotOcr2ImageProcessor(**kwargs)
    return lambda im: processor(images=[im], return_tensors="pt")["pixel_values"]


def runner(impl: str, image: Image.Image):
    """A no-argument callable that tiles `image` with `impl` and returns the float32 [n, 3, 448, 448] tiles."""
    if impl.startswith("gotocr2-"):
        process = got_ocr2(impl.removeprefix("gotocr2-"))
        return lambda: process(image)
    if impl == "floor-output-write":
        n_tiles = dynamic_tile(image).pixel_values.shape[0]
        return lambda: torch.empty((n_tiles, 3, 448, 448)).fill_(0.5)
    return {
        "reference": lambda: ref.dynamic_tile(image).pixel_values,
        "cpp-1-thread": lambda: dynamic_tile(image, num_threads=1).pixel_values,
        "cpp-1-thread-avx2": lambda: dynamic_tile(image, num_threads=1).pixel_values,
        "cpp-all-cores": lambda: dynamic_tile(image, num_threads=CORES).pixel_values,
    }[impl]


@pytest.mark.parametrize("size, impl", [(s, i) for s in SIZES for i in IMPLS], ids=lambda v: str(v))
def test_tile_one_image(benchmark, size: tuple[int, int], impl: str) -> None:
    image = photo(*size)
    forced = "avx2" if impl.endswith("-avx2") else None
    if forced is not None and forced not in supported_isas():
        pytest.skip(f"this CPU has no {forced}")
    allow_simd(forced or True)
    try:
        out = benchmark.pedantic(
            runner(impl, image), rounds=3 if impl in ("reference", "gotocr2-pil") else 7, iterations=1, warmup_rounds=1
        )
        if impl.startswith("cpp-"):
            benchmark.extra_info["isa"] = isa()
    finally:
        allow_simd(True)
    best = benchmark.stats.stats.min
    _min_s[(size, impl)] = best
    benchmark.extra_info.update(
        image=f"{size[0]}x{size[1]}", impl=impl, tiles=int(out.shape[0]), ms=round(best * 1e3, 2),
        output_gb_per_s=round(out.numel() * 4 / best / 1e9, 2),
    )  # fmt: skip
    for base in ("reference", "gotocr2-torchvision", "floor-output-write", "cpp-1-thread-avx2"):
        if (size, base) in _min_s and base != impl:
            benchmark.extra_info[f"speedup_vs_{base}"] = round(_min_s[(size, base)] / best, 2)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_tile_batch_of_16(benchmark, num_threads: int) -> None:
    images = [photo(1920 + i, 1080) for i in range(16)]
    benchmark.pedantic(lambda: dynamic_tile_batch(images, num_threads=num_threads), rounds=5, iterations=1,
                       warmup_rounds=1)  # fmt: skip
    _min_s[("batch16", str(num_threads))] = benchmark.stats.stats.min
    benchmark.extra_info.update(images=16, num_threads=num_threads, ms=round(benchmark.stats.stats.min * 1e3, 1))
    if num_threads == 2:
        benchmark.extra_info["scaling_1_to_2_threads"] = round(_min_s[("batch16", "1")] / benchmark.stats.stats.min, 2)
