"""Peak memory of one call, on CPU (resident set, Linux) or CUDA (the caching allocator's peak)."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch


def _rss_and_peak() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        status = f.read()
    field = lambda name: int(re.search(rf"{name}:\s+(\d+) kB", status).group(1)) * 1024
    return field("VmRSS"), field("VmHWM")


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes above what was resident before `fn()` at its peak (results included until it returns).

    CPU: the kernel's high-water mark of resident memory, reset through /proc/self/clear_refs ("5") just before
    the call, so every allocation counts, torch's or BLAS's workspace alike. CUDA: torch's peak allocated bytes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, _ = _rss_and_peak()
    fn()
    return _rss_and_peak()[1] - before
