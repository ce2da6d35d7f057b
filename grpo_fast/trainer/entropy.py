"""The trainer's side of TRL's entropy options: the top-entropy token mask over the whole batch of every rank, and
the entropy bonus's coefficient, adaptive as in Skywork-OR1 (arXiv:2505.22312) when `use_adaptive_entropy`.

The kernels take the mask and the coefficient as inputs; what needs the batch of every rank or state across
updates lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpo_fast.config import GRPOConfig
from grpo_fast.distributed import DistEnv, all_gather_cat
from grpo_fast.kernels import high_entropy_mask


def gather_valid_entropies(entropy: torch.Tensor, mask: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The entropies of the valid tokens of `mask [B, T]` on every rank, concatenated (rank order): fp32 `[n]`.
    Ranks hold different token counts, so each pads its own to the longest before the all-gather."""
    local = entropy.detach()[mask.bool()].float()
    if env.world == 1:
        return local
    counts = all_gather_cat(torch.tensor([local.numel()], device=local.device), env)
    padded = local.new_zeros(int(counts.max()))
    padded[: local.numel()] = local
    rows = all_gather_cat(padded, env).view(env.world, -1)
    return torch.cat([row[:n] for row, n in zip(rows, counts.tolist())])


def global_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float, env: DistEnv) -> torch.Tensor:
    """TRL's `top_entropy_quantile` mask of this rank's micro-batch, the threshold the `1 - quantile` quantile of the
    valid tokens' entropies of every rank's micro-batch (as TRL gathers them). `entropy/mask [B, T]` -> bool."""
    return high_entropy_mask(entropy, mask, quantile, pool=gather_valid_entropies(entropy, mask, env))


@dataclass
class EntropyControl:
    """The entropy bonus's coefficient (TRL's `entropy_coef` and adaptive options). Adaptive: the bonus applies only
    while the last update's mean entropy was at or below `target` (none yet: not applied), and after each update the
    coefficient moves by `delta` towards more bonus when that entropy is at or below `target`, less above, within
    [`coef_min`, `coef_max`]."""

    coef: float
    adaptive: bool = False
    coef_min: float = 0.0
    coef_max: float = 1.0
    delta: float = 0.005
    target: float = 0.2
    last_entropy: float = math.inf  # the mean entropy of the last update (nats)

    @classmethod
    def from_config(cls, cfg: GRPOConfig) -> EntropyControl:
        return cls(cfg.entropy_coef, cfg.use_adaptive_entropy, cfg.entropy_coef_min, cfg.entropy_coef_max,
                   cfg.entropy_coef_delta, cfg.entropy_target)

    def applied(self) -> float:
        """The coefficient this update's loss uses."""
        if self.adaptive and not self.last_entropy <= self.target:
            return 0.0
        return self.coef

    def update(self, entropy: float) -> None:
        """After an update whose mean entropy over the tokens the policy term acted on (every rank) was `entropy`."""
        if not self.adaptive:
            return
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = entropy

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef, self.last_entropy = state["coef"], state["last_entropy"]
