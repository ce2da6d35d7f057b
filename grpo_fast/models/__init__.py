"""Policy models: the tiny built-in InternVL and loading of InternVL -hf and Qwen-VL checkpoints."""

from grpo_fast.models.policy import PRESETS, Policy, Tiling, load_policy
from grpo_fast.models.tiny import TinySpec, build_tokenizer, tiny_internvl

__all__ = ["PRESETS", "Policy", "Tiling", "TinySpec", "build_tokenizer", "load_policy", "tiny_internvl"]
