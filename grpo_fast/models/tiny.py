"""The tiny built-in InternVL: a few million parameters of the real HF architecture, trainable on 2 CPU cores.

Same classes as a real `-hf` InternVL checkpoint (InternVLForConditionalGeneration = InternViT + pixel-shuffle
projector + Qwen2), only smaller: 64-pixel tiles cut into 8-pixel patches give 8 x 8 patches per tile, and the
pixel shuffle (downsample ratio 0.5) turns them into 4 x 4 = 16 image tokens per tile. The tokenizer is a
byte-level BPE trained here on the synthetic generator's texts (so every string round-trips) plus InternVL's
special tokens and a Qwen2-style chat template.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2Config
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from grpo_fast.data.synthetic import corpus

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
# The InternVL -hf template's layout: an image part becomes "<IMG_CONTEXT>\n", which the prompt renderer
# expands to "<img>" + "<IMG_CONTEXT>" x (tokens per tile x tiles) + "</img>", as InternVLProcessor does.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (default: the synthetic corpus) with the chat/image tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, IM_START, IM_END, *IMAGE_TOKENS.values()]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*(texts if texts is not None else corpus()), "user", "assistant", "system"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=IMAGE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model (defaults: about 1.1 M parameters; see `tiny_internvl`)."""

    tile_size: int = 64  # pixels per tile side
    patch_size: int = 8  # pixels per ViT patch side: (64 / 8)^2 = 64 patches per tile
    vision_hidden: int = 96
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 4
    heads: int = 4
    max_tiles: int = 4  # tiles per image before the thumbnail: at most 5 x 16 = 80 image tokens


def tiny_internvl(tokenizer: PreTrainedTokenizerFast, spec: TinySpec = TinySpec(), seed: int = 0):
    """A randomly initialised InternVLForConditionalGeneration of `spec`'s sizes for `tokenizer`'s vocabulary."""
    vision = InternVLVisionConfig(
        hidden_size=spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.heads,
        intermediate_size=2 * spec.vision_hidden,
        image_size=spec.tile_size,
        patch_size=spec.patch_size,
        # InternViT scales each block's output by a learned factor that starts at 0.1 (for deep pretrained
        # towers); from scratch that starved the image path, so the tiny tower starts at 1.
        layer_scale_init_value=1.0,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=3 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads // 2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=(spec.tile_size // spec.patch_size) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
