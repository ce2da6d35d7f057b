"""Supervised warm start before GRPO: vision pretraining (`vision`), then SFT on drawn targets (`text`, `targets`).

    python -m grpo_fast.sft --help

lists the settings (`SFTConfig`); the trainer runs `train` itself for its warm start.
"""

from grpo_fast.sft.text import SFTConfig, train

__all__ = ["SFTConfig", "train"]
