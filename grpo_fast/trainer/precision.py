"""The one dtype policy of a run (docs/training.md, "Precision"), decided by one pure function.

Master weights and optimizer state are fp32, always. `--bf16` (CUDA only) runs every forward of the policy and
the reference under bf16 autocast: the loss forward, the old / reference log-prob passes, generation (rollouts)
and evaluation alike. The lm_head GEMMs of the fused loss and log-prob passes run outside autocast (a custom
autograd op), so they get the dtype explicitly: bf16 under `--bf16`, with `d weight` accumulated in fp32, unless
`cast_lm_head_to_fp32` (TRL's name) asks for fp32 logits. flash-attn accepts only 16-bit inputs: "auto" picks it
on CUDA only under bf16 autocast, and asking for it without bf16 is an error, never an fp32 flash forward.
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from grpo_fast.config import AttnImplementation, ConfigError


@dataclass(frozen=True)
class Precision:
    attn_implementation: str  # what the model's attention runs: "sdpa", "eager" or "flash_attention_2"
    autocast_dtype: torch.dtype | None  # every policy / reference forward; None: fp32, no autocast
    generation_dtype: torch.dtype  # the compute dtype of rollouts and evaluation (the same autocast)
    lm_head_dtype: torch.dtype  # `compute_dtype` of fused_linear_grpo_loss / fused_linear_logprobs

    def autocast(self, device_type: str) -> AbstractContextManager:
        """The autocast region of every forward (a no-op when autocast_dtype is None)."""
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_precision(
    device_type: str,
    bf16: bool,
    flash_attn_installed: bool,
    attn_implementation: AttnImplementation,
    cast_lm_head_to_fp32: bool,
) -> Precision:
    """The dtypes and attention kernel of a run on `device_type` ("cuda", "cpu"); see the module docstring.
    Raises ConfigError for flash_attention_2 where the forward would be fp32 (or flash-attn is missing)."""
    autocast = torch.bfloat16 if bf16 and device_type == "cuda" else None
    half = autocast is not None
    attn = attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if half and flash_attn_installed else "sdpa"
    elif attn == "flash_attention_2" and not half:
        raise ConfigError("attn_implementation flash_attention_2 needs bf16 forwards, which only CUDA with --bf16 "
                          "runs (flash-attn rejects fp32): add --bf16 on a GPU, or use sdpa")
    elif attn == "flash_attention_2" and not flash_attn_installed:
        raise ConfigError("attn_implementation flash_attention_2 needs flash-attn: pip install flash-attn, or use sdpa")
    compute = autocast or torch.float32
    return Precision(
        attn_implementation=attn,
        autocast_dtype=autocast,
        generation_dtype=compute,
        lm_head_dtype=torch.float32 if cast_lm_head_to_fp32 else compute,
    )
