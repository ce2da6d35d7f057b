"""Conversion of items (and optional completions) to InternVL model inputs.

The prompt is the model's chat template around one image and the question; the image part becomes
`<img>` + `<IMG_CONTEXT>` x (image tokens per tile x tiles) + `</img>`, exactly as HF's InternVLProcessor
expands it. Prompts are left-padded and completions right-padded (TRL's layout), so the completion of every
row starts at the same column P and `input_ids = [prompt_ids | completion_ids]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from grpo_fast.models.policy import Policy


@dataclass
class Batch:
    """Model inputs for B items; N = total tiles, P = longest prompt, C = longest completion (tokens)."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [B, P] long, 1 on prompt tokens
    pixel_values: torch.Tensor  # [N, 3, tile, tile] float32, item after item, each item's tiles row-major + thumbnail
    num_tiles: torch.Tensor  # [B] long, tiles of each item (sums to N)
    completion_ids: torch.Tensor | None = None  # [B, C] long, right-padded, each completion ends in eos
    completion_mask: torch.Tensor | None = None  # [B, C] long, 1 on completion tokens (eos included)

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P + C] prompt then completion (just the prompt without completions)."""
        if self.completion_ids is None:
            return self.prompt_ids
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P + C] 1 on real tokens."""
        if self.completion_mask is None:
            return self.prompt_mask
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """[B, P + C] positions counted from each row's first real token (what generate uses with left padding)."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model(**...)` over prompt + completion."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "pixel_values": self.pixel_values,
        }


def render_prompt(tokenizer: PreTrainedTokenizerBase, question: str, num_image_tokens: int) -> str:
    """The chat prompt (ending with the assistant turn's header) for one image of `num_image_tokens` tokens."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    context = tokenizer.context_image_token
    if context not in text:
        raise ValueError(f"the tokenizer's chat template renders no {context} for an image part")
    image = tokenizer.start_image_token + context * num_image_tokens + tokenizer.end_image_token
    return text.replace(context, image, 1)


def collate(policy: Policy, items: Sequence[dict[str, Any]], completions: Sequence[str] | None = None) -> Batch:
    """Tiles each item's image, renders its prompt and tokenizes; completions (if given) get eos appended."""
    if not items:
        raise ValueError("collate needs at least one item")
    if completions is not None and len(completions) != len(items):
        raise ValueError(f"got {len(completions)} completions for {len(items)} items")
    tok = policy.tokenizer
    tiles = []
    for item in items:
        with Image.open(item["image"]) as image:
            tiles.append(policy.tiling.tile(image.convert("RGB")).pixel_values)
    prompts = [render_prompt(tok, it["question"], len(t) * policy.image_seq_length) for it, t in zip(items, tiles)]
    enc = tok(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    batch = Batch(
        prompt_ids=enc["input_ids"],
        prompt_mask=enc["attention_mask"],
        pixel_values=torch.cat(tiles),
        num_tiles=torch.tensor([len(t) for t in tiles]),
    )
    if completions is not None:
        enc = tok(
            [c + tok.eos_token for c in completions],
            add_special_tokens=False,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        batch.completion_ids, batch.completion_mask = enc["input_ids"], enc["attention_mask"]
    return batch
