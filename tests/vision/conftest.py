"""Under `make asan`, GRPO_FAST_TILING_SO names the sanitizer build of the tiler: it is loaded as `grpo_fast._tiling`
before a test module imports grpo_fast.vision, so that the suite's own build stays in place for everyone else."""

import importlib.util
import os
import sys

import grpo_fast

_SANITIZED = os.environ.get("GRPO_FAST_TILING_SO")
if _SANITIZED:
    if "grpo_fast._tiling" in sys.modules:
        raise RuntimeError(
            "grpo_fast._tiling was imported before tests/vision/conftest.py could load GRPO_FAST_TILING_SO"
        )
    spec = importlib.util.spec_from_file_location("grpo_fast._tiling", _SANITIZED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["grpo_fast._tiling"] = grpo_fast._tiling = module
