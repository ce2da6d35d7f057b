"""Rollouts: what one micro-batch of sampled groups holds, and how each of its completions is seeded.

Every completion row samples from its own generator (`grpo_fast.models.generation.SeededSampler`), seeded by
(seed, step, its global row index) alone, not by which rows share its batch or its process. That is what makes a
resumed run sample exactly what an uninterrupted one would, and `torchrun` with N processes sample what one
process does on the same global batch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from grpo_fast.models.inputs import Batch


def row_seed(seed: int, step: int, row: int) -> int:
    """A 63-bit seed for one completion row of one step."""
    digest = hashlib.blake2b(f"{seed}/{step}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class Rollout:
    """One micro-batch of B = prompts x G completions, a group's members contiguous; C completion tokens."""

    items: list[dict[str, Any]]  # B dataset items (each prompt's item repeated G times)
    batch: Batch  # prompts and completions (completion_mask is the loss mask)
    texts: list[str]  # B decoded completions
    rewards: torch.Tensor  # [B, K] one column per reward function, NaN = unscorable
    advantages: torch.Tensor  # [B]
    old_logp: torch.Tensor | None  # [B, C] when num_iterations > 1 (the loss batch's rows)
    ref_logp: torch.Tensor | None  # [B, C] when beta > 0 (the loss batch's rows)
    truncated: torch.Tensor  # [B] bool
    lengths: torch.Tensor  # [B] sampled tokens per completion
    # the rows the loss trains on when some are left out (mask_zero_std_groups), and their batch (old_logp and
    # ref_logp are theirs); None: all B rows, `batch`
    loss_rows: torch.Tensor | None = None  # [B'] long, ascending
    loss_batch: Batch | None = None

    @property
    def trained(self) -> tuple[Batch, torch.Tensor]:
        """The loss's batch and its rows' advantages `[B']`."""
        if self.loss_rows is None:
            return self.batch, self.advantages
        if not len(self.loss_rows):  # no signal: a stand-in group with a zero mask
            return self.loss_batch, self.advantages.new_zeros(self.loss_batch.prompt_ids.shape[0])
        return self.loss_batch, self.advantages[self.loss_rows]


def sample_records(r: Rollout, step: int, count: int) -> list[dict[str, Any]]:
    """The first `count` completions of a rollout, as samples.jsonl records."""
    return [
        {
            "step": step,
            "question": it["question"],
            "level": it["level"],
            "image": it["image"],
            "completion": text,
            "rewards": [None if math.isnan(v) else v for v in rewards.tolist()],
            "advantage": float(adv),
        }
        for it, text, rewards, adv in list(zip(r.items, r.texts, r.rewards, r.advantages))[:count]
    ]
