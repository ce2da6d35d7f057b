"""Conversion of items (and optional completions) to model inputs, for InternVL and Qwen-VL policies.

The prompt is the model's chat template around one image and the question; the template's image placeholder is
expanded to one token per image embedding, exactly as the HF processors do:
- InternVL: `<img>` + `<IMG_CONTEXT>` x (image tokens per tile x tiles) + `</img>`, tiles from `grpo_fast.vision`;
- Qwen-VL: `<|image_pad|>` x (patches / merge_size^2), patches and `image_grid_thw` from HF's image processor.
Prompts are left-padded and completions right-padded (TRL's layout), so the completion of every row starts at the
same column P and `input_ids = [prompt_ids | completion_ids]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase

from grpo_fast.models.policy import Policy


@dataclass
class Batch:
    """Model inputs for B items; P = longest prompt, C = longest completion (tokens). InternVL batches carry
    `num_tiles`, Qwen-VL batches `image_grid_thw` and `image_token_mask`."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [B, P] long, 1 on prompt tokens
    # InternVL: [N tiles, 3, tile, tile] float32, item after item, each item's tiles row-major + thumbnail;
    # Qwen-VL: [N patches, 3 x temporal_patch x patch x patch] float32, item after item
    pixel_values: torch.Tensor
    num_tiles: torch.Tensor | None = None  # [B] long, InternVL: tiles of each item (sums to N)
    image_grid_thw: torch.Tensor | None = None  # [B, 3] long, Qwen-VL: (t, h, w) patches of each item's image
    image_token_mask: torch.Tensor | None = None  # [B, P] long, Qwen-VL: 1 on image tokens (mm_token_type_ids)
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

    def _vision_inputs(self, width: int) -> dict[str, torch.Tensor]:
        if self.image_grid_thw is None:
            return {"pixel_values": self.pixel_values}
        # Qwen-VL derives its 3-D (mrope) positions from the image tokens, their grids and the attention mask
        types = F.pad(self.image_token_mask, (0, width - self.image_token_mask.shape[1]))
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw, "mm_token_type_ids": types}

    def prompt_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model.generate(**...)` over the prompts."""
        ids = self.prompt_ids
        return {"input_ids": ids, "attention_mask": self.prompt_mask, **self._vision_inputs(ids.shape[1])}

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model(**...)` over prompt + completion."""
        ids = self.input_ids
        out = {"input_ids": ids, "attention_mask": self.attention_mask, **self._vision_inputs(ids.shape[1])}
        if self.image_grid_thw is None:
            out["position_ids"] = self.position_ids
        return out


def render_prompt(tokenizer: PreTrainedTokenizerBase, question: str, placeholder: str, image: str) -> str:
    """The chat prompt (ending with the assistant turn's header) for one image and `question`, where the
    template's image `placeholder` (what it renders for an image part) becomes `image` (the expanded tokens)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if placeholder not in text:
        raise ValueError(f"the tokenizer's chat template renders no {placeholder} for an image part")
    return text.replace(placeholder, image, 1)


def load_rgb(path: str) -> Image.Image:
    """The image file at `path` as an RGB PIL image (file closed)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _internvl_prompts(policy: Policy, items: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    tok = policy.tokenizer
    tiles = [policy.tiling.tile(load_rgb(it["image"])).pixel_values for it in items]
    context = tok.context_image_token
    prompts = [
        render_prompt(
            tok,
            it["question"],
            context,
            tok.start_image_token + context * (len(t) * policy.image_seq_length) + tok.end_image_token,
        )
        for it, t in zip(items, tiles)
    ]
    return prompts, {"pixel_values": torch.cat(tiles), "num_tiles": torch.tensor([len(t) for t in tiles])}


def _qwen_vl_prompts(policy: Policy, items: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    processor = policy.image_processor
    vision = processor(images=[load_rgb(it["image"]) for it in items], return_tensors="pt")
    grid = vision["image_grid_thw"]
    pad = policy.tokenizer.convert_ids_to_tokens(policy.image_token_id)
    counts = (grid.prod(-1) // processor.merge_size**2).tolist()  # merge_size^2 patches -> one token
    prompts = [render_prompt(policy.tokenizer, it["question"], pad, pad * n) for it, n in zip(items, counts)]
    return prompts, {"pixel_values": vision["pixel_values"], "image_grid_thw": grid}


def collate(policy: Policy, items: Sequence[dict[str, Any]], completions: Sequence[str] | None = None) -> Batch:
    """Preprocesses each item's image, renders its prompt and tokenizes; completions (if given) get eos appended."""
    if not items:
        raise ValueError("collate needs at least one item")
    if completions is not None and len(completions) != len(items):
        raise ValueError(f"got {len(completions)} completions for {len(items)} items")
    tok = policy.tokenizer
    prompts, vision = (_internvl_prompts if policy.tiling is not None else _qwen_vl_prompts)(policy, items)
    enc = tok(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    batch = Batch(prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"], **vision)
    if batch.image_grid_thw is not None:
        batch.image_token_mask = (batch.prompt_ids == policy.image_token_id).long()
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
