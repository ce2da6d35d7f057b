"""A 12000 x 9000 image tiles in memory proportional to the output, not to a float copy of the input."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import resource
    import numpy as np
    from PIL import Image
    from grpo_fast.vision import dynamic_tile
    from grpo_fast.vision.tiling import pillow_resize

    image = np.empty((9000, 12000, 3), np.uint8)
    image[:] = np.random.default_rng(0).integers(0, 256, (1, 12000, 3), dtype=np.uint8)
    image[::7] //= 2  # rows differ too
    pillow_resize(image[:1000], 448, 448)  # warm-up: imports, thread start, allocator pools
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = dynamic_tile(image, num_threads=2)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    want = np.asarray(Image.fromarray(image).resize((448, 448), Image.Resampling.BICUBIC))
    got = out.pixel_values[-1].numpy() * np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    got += np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    err = np.abs(got.transpose(1, 2, 0) * 255 - want).max()
    print(out.grid, tuple(out.pixel_values.shape), round(grown_mib, 1), float(err))
    """
)


def test_very_large_image_memory():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    grid_shape, grown_mib, err = run.stdout.strip().rsplit(" ", 2)
    assert grid_shape.startswith("(4, 3) (13, 3, 448, 448)"), run.stdout
    # Output: 13 * 3 * 448 * 448 * 4 B = 30 MiB. A float32 copy of the input would be 1236 MiB.
    assert float(grown_mib) < 100, run.stdout
    assert float(err) <= 1.001, run.stdout  # the thumbnail equals Pillow's resize of the whole image
