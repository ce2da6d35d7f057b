"""Completions with HF `generate` (KV cache, stop at EOS): greedy, or sampled row by row with seeded generators.

`generate_completions` is the one generation path: the trainer's rollouts and evaluation and SFT's sampled val
reward all go through it, so every completion skips the same special tokens and ends the same way.

Sampling: `SeededSampler` is a logits processor that applies temperature, top-k and top-p itself, draws one token
per row by inverse-CDF sampling with the row's own generator, and returns logits with all the mass on that token;
generate runs greedy (argmax) on top of it, so it picks exactly the drawn token. A row's completion then depends
only on its seed, not on which rows share its batch or its process.

Groups (a batch of `collate(..., repeats=G)`): each image is encoded once. InternVL prompts are also prefilled once
per group: the KV cache of the prompt but its last token is computed for one row and repeated for the G rows, then
generate runs each row's last prompt token and decodes, as after prefilling every row itself (the same positions
and masks, so the same tokens up to float rounding). Qwen-VL keeps generate's own prefill of every row (its 3-D
positions are derived inside generate), with the shared image features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from grpo_fast.models.inputs import Batch, group_size, image_features, prefill_groups


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
def generate_completions(
    model: torch.nn.Module,
    batch: Batch,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    logits_processor: LogitsProcessor | None = None,
    synced: bool = False,
) -> Completions:
    """Completions for the prompts of `batch`: greedy, or sampled when `logits_processor` is a sampler such as
    `SeededSampler`. `synced` keeps every rank decoding until all are done (a sharded model's forward is a
    collective)."""
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
    shared = batch.image_index is not None
    inputs: dict = {k: v.to(param.device) for k, v in batch.prompt_inputs(pixels=not shared).items()}
    if not shared:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    elif batch.image_grid_thw is None and (group := group_size(batch)) > 1:
        inputs["cache"] = prefill_groups(model, batch, group, width=batch.prompt_ids.shape[1] - 1).cache
    else:
        inputs["mm_encoder_outputs"] = {"image": image_features(model, batch)}
    out = model.generate(
        **inputs,
        generation_config=config,
        logits_processor=LogitsProcessorList([logits_processor] if logits_processor is not None else []),
        synced_gpus=synced,
    )
    ids = out[:, batch.prompt_ids.shape[1] :].cpu()
    is_eos = ids == eos_id
    # position of the first EOS (C when there is none); the mask keeps tokens up to and including it
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1])
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) <= first.unsqueeze(1)).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    return Completions(ids=ids, mask=mask, truncated=~is_eos.any(1))
