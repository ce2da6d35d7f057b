"""The learning-rate schedule of every stage (GRPO, SFT, vision pretraining): a multiplier of the peak rate.

Linear warm-up over `warmup` updates, then a decay over the remaining `total - warmup` to `floor` x the peak:
linear, cosine, or none (constant). GRPO uses TRL's names (`lr_scheduler_type`, `warmup_steps`) with floor 0; SFT
decays with a cosine to 10% of its peak.
"""

from __future__ import annotations

import math

from grpo_fast.config import LRSchedulerType


def lr_factor(
    update: int,
    *,
    total: int,
    warmup: int,
    kind: LRSchedulerType = "linear",
    floor: float = 0.0,
    peak_in_warmup: bool = False,
) -> float:
    """Multiplier of the peak learning rate at `update` (0-based) of `total` (`torch.optim.lr_scheduler.LambdaLR`).

    Warm-up: `(update + 1) / (warmup + 1)`, so the peak comes with the first decay update; with `peak_in_warmup`
    `(update + 1) / warmup`, reaching the peak on the last warm-up update. Past `total` the decay stays at its end.
    """
    if update < warmup:
        return (update + 1) / (warmup if peak_in_warmup else warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min((update - warmup) / max(total - warmup, 1), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * shape
