"""Peak memory and wall time of one call, on CPU (resident set, Linux) or CUDA (the caching allocator, synchronized).

CUDA runs asynchronously: a clock read right after a call measures its launches, not its work. Every timing here
synchronizes the device before each clock read, and CUDA peaks come from the allocator's own high-water mark.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import torch


def _rss_and_peak() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        status = f.read()
    field = lambda name: int(re.search(rf"{name}:\s+(\d+) kB", status).group(1)) * 1024
    return field("VmRSS"), field("VmHWM")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes above what was resident before `fn()` at its peak (results included until it returns).

    CPU: the kernel's high-water mark of resident memory, reset through /proc/self/clear_refs ("5") just before
    the call, so every allocation counts, torch's or BLAS's workspace alike. CUDA: `max_memory_allocated` after
    `reset_peak_memory_stats`, above what was allocated before (the allocator's cache not counted).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, _ = _rss_and_peak()
    fn()
    return _rss_and_peak()[1] - before


def median_seconds(fn: Callable[[], object], device: torch.device, rounds: int) -> float:
    """Median wall time of `rounds` calls of `fn`, the device synchronized before each clock read."""
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
