"""The compiled C++ extension `grpo_fast._tiling` (the image tiler and the CPU row ops), imported once, with one
error line that says how to build it."""

try:
    from grpo_fast import _tiling
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "grpo_fast._tiling (the C++ image tiler and row ops) is not built: run `pip install -e .` in the repository "
        "root (needs g++ and CMake)"
    ) from err

__all__ = ["_tiling"]
