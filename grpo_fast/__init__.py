"""grpo_fast: GRPO for vision-language models with fused kernels under a thin trainer."""

__version__ = "0.1.0"
