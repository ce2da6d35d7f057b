"""The C++ extension's import: without a build, the tiler and the row ops fail with one line that says how to build."""

import subprocess
import sys

import pytest

# Each snippet hides the built extension (a None entry in sys.modules makes its import fail), then imports a user.
HIDE = "import sys; sys.modules['grpo_fast._tiling'] = None; import "


@pytest.mark.parametrize("module", ["grpo_fast.vision.tiling", "grpo_fast.kernels.rowwise_torch"])
def test_an_unbuilt_extension_says_how_to_build_it(module):
    proc = subprocess.run([sys.executable, "-c", HIDE + module], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: grpo_fast._tiling (the C++ image tiler and row ops) is not built")
    assert "pip install -e ." in last
