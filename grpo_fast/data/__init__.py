"""Datasets: the seed-format loader, scenes and phrasing of the synthetic data (generator: `grpo_fast.data.synthetic`;
train/val folders: `grpo_fast.data.splits`)."""

from grpo_fast.data.phrasing import gold_answer, warm_start_reply
from grpo_fast.data.scene import Scene, SceneObject, Target
from grpo_fast.data.seed import SeedFormatError, load_seed

__all__ = [
    "Scene",
    "SceneObject",
    "SeedFormatError",
    "Target",
    "gold_answer",
    "load_seed",
    "warm_start_reply",
]
