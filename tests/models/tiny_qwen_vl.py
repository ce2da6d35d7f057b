"""Tiny random Qwen-VL checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) written to a folder, built from configs alone.

The tokenizer is the project's tiny BPE plus Qwen's vision tokens and a Qwen-style chat template (an image part
renders as `<|vision_start|><|image_pad|><|vision_end|>`); the image processor is HF's Qwen2VLImageProcessor with
8-pixel patches and at most 64 x 64 pixels, so an image is at most 64 patches = 16 image tokens.
"""

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from grpo_fast.models import build_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# head_dim 16: the rotary half (8) split over (t, h, w)
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
VISION = {"depth": 1, "num_heads": 2, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}
VISION_CONFIGS = {
    "qwen2_vl": (Qwen2VLConfig, {"embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2}),
    "qwen2_5_vl": (
        Qwen2_5_VLConfig,
        {
            "hidden_size": 32,
            "out_hidden_size": 32,
            "intermediate_size": 64,
            "window_size": 16,
            "fullatt_block_indexes": [0],
        },
    ),
    "qwen3_vl": (
        Qwen3VLConfig,
        {
            "hidden_size": 32,
            "out_hidden_size": 32,
            "intermediate_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
    ),
}


def save_tiny_qwen_vl(folder: Path, model_type: str, seed: int = 0) -> Path:
    """Writes a randomly initialised `model_type` checkpoint (~0.1 M parameters) with tokenizer and image processor."""
    tok = build_tokenizer(["What colour is the circle? It is red. Which one do you mean?"], vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    ids = dict(zip(("vision_start", "image", "vision_end", "video"), tok.convert_tokens_to_ids(VISION_TOKENS)))
    text = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_parameters": ROPE,
        "bos_token_id": None,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if model_type == "qwen3_vl":  # its head_dim defaults to 128, and its mrope interleaves t, h, w
        text |= {"head_dim": 16, "rope_parameters": ROPE | {"mrope_interleaved": True}}
    config_class, vision = VISION_CONFIGS[model_type]
    config = config_class(
        vision_config=VISION | vision,
        text_config=text,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2).save_pretrained(folder)
    return folder
