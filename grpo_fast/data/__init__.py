"""Datasets: the seed-format loader, the synthetic ambiguity generator and conversion to model inputs."""

from grpo_fast.data.phrasing import gold_answer, warm_start_reply
from grpo_fast.data.scene import Scene, SceneObject, Target
from grpo_fast.data.seed import SeedFormatError, load_seed
from grpo_fast.data.synthetic import generate

__all__ = [
    "Scene",
    "SceneObject",
    "SeedFormatError",
    "Target",
    "generate",
    "gold_answer",
    "load_seed",
    "warm_start_reply",
]
