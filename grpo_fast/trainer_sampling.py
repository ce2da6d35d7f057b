"""Rollouts with HF `generate` (KV cache, stop at EOS) where every row samples from its own seeded generator.

Why per-row generators: a completion then depends only on (seed, step, its global row index), not on which
rows share its batch or its process. That is what makes a resumed run sample exactly what an uninterrupted one
would, and `torchrun` with N processes sample what one process does on the same global batch.

How: `SeededSampler` is a logits processor that applies temperature, top-k and top-p itself, draws one token per
row by inverse-CDF sampling with the row's generator, and returns logits with all the mass on that token; generate
runs greedy (argmax) on top of it, so it picks exactly the drawn token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from grpo_fast.data.collate import Batch


def row_seed(seed: int, step: int, row: int) -> int:
    """A 63-bit seed for one completion row of one step."""
    digest = hashlib.blake2b(f"{seed}/{step}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class SeededSampler(LogitsProcessor):
    """Samples row i with `generators[i]` after temperature / top-k / top-p; returns 0 at the pick, -inf elsewhere."""

    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # [B, V]
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = logits.softmax(dim=-1)
        if self.top_p < 1.0:
            # keep the smallest set of likeliest tokens whose mass reaches top_p (the first token always stays)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            probs = probs.masked_fill(drop_sorted.scatter(1, order, drop_sorted), 0.0)
        cdf = probs.cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(cdf.device)
        # first index whose cdf exceeds u * mass: never a zero-probability token
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, picks, 0.0)


def suppressed_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens a completion must never hold (image placeholders, chat markers, pad): all but EOS. An image
    token sampled into a completion would make the prompt + completion forward see more image slots than images."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return sorted(special - {tokenizer.eos_token_id})


@dataclass
class Completions:
    """Generated completions: `ids [B, C]` (pad after the end), `mask [B, C]` (1 up to and including EOS)."""

    ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    batch: Batch,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    sampler: SeededSampler | None = None,
    synced: bool = False,
) -> Completions:
    """Completions for the prompts of `batch`: sampled with `sampler`, or greedy when it is None. `synced` keeps
    every rank decoding until all are done (a sharded model's forward is a collective)."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        suppress_tokens=suppressed_ids(tokenizer),
        use_cache=True,
    )
    param = next(model.parameters())
    inputs = {k: v.to(param.device) for k, v in batch.prompt_inputs().items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    out = model.generate(
        **inputs,
        generation_config=config,
        logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
        synced_gpus=synced,
    )
    ids = out[:, batch.prompt_ids.shape[1] :].cpu()
    is_eos = ids == eos_id
    # position of the first EOS (C when there is none); the mask keeps tokens up to and including it
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1])
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) <= first.unsqueeze(1)).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    return Completions(ids=ids, mask=mask, truncated=~is_eos.any(1))
