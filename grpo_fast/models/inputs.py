"""Conversion of items (and optional completions) to model inputs, for InternVL and Qwen-VL policies.

The prompt is the model's chat template around one image and the question; the template's image placeholder is
expanded to one token per image embedding, exactly as the HF processors do:
- InternVL: `<img>` + `<IMG_CONTEXT>` x (image tokens per tile x tiles) + `</img>`, tiles from `grpo_fast.vision`;
- Qwen-VL: `<|image_pad|>` x (patches / merge_size^2), patches and `image_grid_thw` from HF's image processor.
Prompts are left-padded and completions right-padded (TRL's layout), so the completion of every row starts at the
same column P and `input_ids = [prompt_ids | completion_ids]`.

A group's G rows repeat one prompt. `collate(..., repeats=G)` keeps one copy of each image and a row -> image index,
and `image_features` encodes each image once and hands its features to every row that shows it (HF's
`mm_encoder_outputs`, which the model scatters into the image tokens exactly as it does its own encodings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from grpo_fast.models.policy import Policy


@dataclass
class Batch:
    """Model inputs for B rows showing I images; P = longest prompt, C = longest completion (tokens). Without
    `image_index` row i shows image i (I = B); with it, the rows that repeat one prompt share one copy of its image.
    InternVL batches carry `num_tiles`, Qwen-VL batches `image_grid_thw` and `image_token_mask`."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [B, P] long, 1 on prompt tokens
    # InternVL: [N tiles, 3, tile, tile] float32, image after image, each image's tiles row-major + thumbnail;
    # Qwen-VL: [N patches, 3 x temporal_patch x patch x patch] float32, image after image
    pixel_values: torch.Tensor
    num_tiles: torch.Tensor | None = None  # [I] long, InternVL: tiles of each image (sums to N)
    image_grid_thw: torch.Tensor | None = None  # [I, 3] long, Qwen-VL: (t, h, w) patches of each image
    image_token_mask: torch.Tensor | None = None  # [B, P] long, Qwen-VL: 1 on image tokens (mm_token_type_ids)
    completion_ids: torch.Tensor | None = None  # [B, C] long, right-padded, each completion ends in eos
    completion_mask: torch.Tensor | None = None  # [B, C] long, 1 on completion tokens (eos included)
    image_index: torch.Tensor | None = None  # [B] long: the image each row shows (None: row i shows image i)

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

    @property
    def row_images(self) -> torch.Tensor:
        """[B] long: the image each row shows."""
        if self.image_index is None:
            return torch.arange(self.prompt_ids.shape[0])
        return self.image_index

    def row_units(self) -> torch.Tensor:
        """[rows' tiles or patches] long: the `pixel_values` rows (InternVL tiles, Qwen-VL patches) of each row's image,
        row after row: where HF's one-image-per-row layout takes each of its pixel rows from."""
        return self._units(self.row_images)

    def _units(self, images: torch.Tensor) -> torch.Tensor:
        """The `pixel_values` rows of `images` (`[n]` long image indices), image after image."""
        sizes = self.num_tiles if self.image_grid_thw is None else self.image_grid_thw.prod(-1)
        starts = sizes.cumsum(0) - sizes
        return torch.cat([torch.arange(s, s + n) for s, n in zip(starts[images].tolist(), sizes[images].tolist())])

    def select(self, rows: torch.Tensor) -> Batch:
        """The batch of `rows` (`[B']` long, ascending) alone, with only the images they show; prompt and completion
        widths stay P and C."""
        images, index = torch.unique(self.row_images[rows], return_inverse=True)  # ascending, as rows are
        units = self._units(images)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return Batch(
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            pixel_values=self.pixel_values[units],
            num_tiles=None if self.num_tiles is None else self.num_tiles[images],
            image_grid_thw=None if self.image_grid_thw is None else self.image_grid_thw[images],
            image_token_mask=pick(self.image_token_mask),
            completion_ids=pick(self.completion_ids),
            completion_mask=pick(self.completion_mask),
            image_index=None if self.image_index is None else index,
        )

    def _vision_inputs(self, width: int, pixels: bool) -> dict[str, torch.Tensor]:
        shared = self.image_index is not None
        out = {"pixel_values": self.pixel_values[self.row_units()] if shared else self.pixel_values} if pixels else {}
        if self.image_grid_thw is None:
            return out
        # Qwen-VL derives its 3-D (mrope) positions from the image tokens, their grids and the attention mask
        types = F.pad(self.image_token_mask, (0, width - self.image_token_mask.shape[1]))
        grid = self.image_grid_thw[self.image_index] if shared else self.image_grid_thw
        return out | {"image_grid_thw": grid, "mm_token_type_ids": types}

    def prompt_inputs(self, *, pixels: bool = True) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model.generate(**...)` over the prompts, a copy of its image per row (HF's layout);
        `pixels=False` leaves pixel_values out (for `mm_encoder_outputs=image_features(...)`)."""
        ids = self.prompt_ids
        return {"input_ids": ids, "attention_mask": self.prompt_mask, **self._vision_inputs(ids.shape[1], pixels)}

    def model_inputs(self, *, pixels: bool = True) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model(**...)` over prompt + completion, a copy of its image per row (HF's layout);
        `pixels=False` leaves pixel_values out (for `mm_encoder_outputs=image_features(...)`)."""
        ids = self.input_ids
        out = {"input_ids": ids, "attention_mask": self.attention_mask, **self._vision_inputs(ids.shape[1], pixels)}
        if self.image_grid_thw is None:
            out["position_ids"] = self.position_ids
        return out


def image_features(model: torch.nn.Module, batch: Batch) -> ModelOutput:
    """The vision encoder's output for the batch's I images, each encoded once, then gathered for the B rows
    (`pooler_output`: InternVL `[rows' tiles, tokens per tile, D]`, Qwen-VL one `[tokens, D]` per row, as are
    Qwen3-VL's deepstack features): what `model(..., mm_encoder_outputs={"image": ...})` scatters into the image
    tokens in place of encoding `pixel_values` itself. Under autograd the rows' gradients sum into the one encoding.
    Pixels go to the model's device and dtype; under FSDP2 `get_image_features` is a registered forward method of the
    root (`grpo_fast.distributed.shard`)."""
    weight = model.get_output_embeddings().weight
    pixels = batch.pixel_values.to(weight.device, weight.dtype)
    if batch.image_grid_thw is None:
        out = model.get_image_features(pixel_values=pixels)
        out.pooler_output = out.pooler_output[batch.row_units().to(weight.device)]  # tiles -> rows' tiles
        return out
    out = model.get_image_features(pixel_values=pixels, image_grid_thw=batch.image_grid_thw.to(weight.device))
    rows = batch.row_images.tolist()
    out.pooler_output = [out.pooler_output[i] for i in rows]
    if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, one tensor per image
        out.deepstack_features = [[layer[i] for i in rows] for layer in out.deepstack_features]
    return out


def group_size(batch: Batch) -> int:
    """G when the batch's rows are whole groups of G copies of one prompt and its image (collate's `repeats`), else 1."""
    rows, images = batch.prompt_ids.shape[0], int(batch.row_images.max()) + 1
    g = rows // images
    whole = batch.image_index is not None and g * images == rows
    if not whole or not torch.equal(batch.image_index, torch.arange(images).repeat_interleave(g)):
        return 1
    return g if torch.equal(batch.prompt_ids, batch.prompt_ids[::g].repeat_interleave(g, 0)) else 1


def prefill_groups(model: torch.nn.Module, batch: Batch, group: int, *, width: int, **kwargs: Any) -> ModelOutput:
    """`model(...)` over the first `width` prompt columns of one row per group of an InternVL batch (each image
    encoded once), with its KV cache (`.cache`) repeated for the group's `group` rows: the cache every row of the
    group would have built itself. Positions count from each row's first real token, as generate's and
    `Batch.position_ids`. `kwargs` go to the model (output_hidden_states=True, ...)."""
    weight = model.get_output_embeddings().weight
    ids, mask = batch.prompt_ids[::group, :width], batch.prompt_mask[::group, :width]
    out = model(
        input_ids=ids.to(weight.device),
        attention_mask=mask.to(weight.device),
        position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(weight.device),
        pixel_values=batch.pixel_values.to(weight.device, weight.dtype),
        use_cache=True,
        logits_to_keep=1,
        **kwargs,
    )
    out.cache.batch_repeat_interleave(group)
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


def collate(
    policy: Policy,
    items: Sequence[dict[str, Any]],
    completions: Sequence[str] | None = None,
    *,
    repeats: int = 1,
) -> Batch:
    """Preprocesses each item's image, renders its prompt and tokenizes; completions (if given, one per row) get eos
    appended. `repeats` > 1: each item becomes that many consecutive rows sharing one copy of its image
    (`image_index`), as a GRPO group does."""
    if not items:
        raise ValueError("collate needs at least one item")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rows = len(items) * repeats
    if completions is not None and len(completions) != rows:
        repeated = f" x {repeats} repeats = {rows} rows" if repeats > 1 else ""
        raise ValueError(f"got {len(completions)} completions for {len(items)} items{repeated}")
    tok = policy.tokenizer
    prompts, vision = (_internvl_prompts if policy.tiling is not None else _qwen_vl_prompts)(policy, items)
    enc = tok(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"].repeat_interleave(repeats, 0), enc["attention_mask"].repeat_interleave(repeats, 0)
    index = torch.arange(len(items)).repeat_interleave(repeats) if repeats > 1 else None
    batch = Batch(prompt_ids=ids, prompt_mask=mask, image_index=index, **vision)
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
