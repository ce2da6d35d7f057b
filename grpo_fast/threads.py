"""How many CPU threads torch gets: a setting, or chosen at start from the cores and how busy they are.

On an idle 2-core AMD EPYC, two threads made the tiny default's GRPO steps 1.56x faster than one; beside other busy
processes they made it far slower (12 SFT steps: 93 s with two threads against 3.6 s with one at a load of 8), as
OpenMP's threads wait for one another whenever one is descheduled. So "auto" (0) takes one thread per usable core
less the cores other processes keep busy right now (sampled from /proc/stat over a quarter second; the 1-minute
load average where there is none, which still counts work that just ended), never fewer than one. The thread count
changes float rounding (the order of a parallel reduction), so the trainer records the resolved count in the run's
config.yaml and a resumed run reuses it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

AUTO = 0
_PROC_STAT = Path("/proc/stat")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's first line."""
    fields = [int(v) for v in _PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores(interval_s: float = 0.25) -> float:
    """How many cores' worth of CPU other processes use now: /proc/stat sampled `interval_s` apart (this process
    sleeps meanwhile), or the 1-minute load average where /proc/stat is missing."""
    if not _PROC_STAT.is_file():
        return os.getloadavg()[0]
    busy0, total0 = _cpu_times()
    time.sleep(interval_s)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def resolve_threads(requested: int, busy: float | None = None) -> int:
    """`requested` when positive; for AUTO (0) the usable cores less the `busy` ones (default: `busy_cores()`),
    rounded to the nearest count, at least 1 and at most the usable cores."""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0: auto), got {requested}")
    if requested > 0:
        return requested
    cores = usable_cores()
    return max(1, min(cores, round(cores - (busy_cores() if busy is None else busy))))
