"""Model inputs: chat prompts with the image expanded like the HF processors, padding, and the Batch views."""

import pytest
import torch
from PIL import Image

from grpo_fast.models.inputs import collate, load_rgb, render_prompt


def test_prompt_expands_the_image_like_the_hf_processor(tiny_policy):
    image = "<img>" + "<IMG_CONTEXT>" * 48 + "</img>"
    text = render_prompt(tiny_policy.tokenizer, "What colour is the circle?", "<IMG_CONTEXT>", image)
    assert text == (
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 48 + "</img>\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_collate_left_pads_prompts_and_right_pads_completions(tiny_policy, few_items):
    batch = collate(tiny_policy, few_items, ["Red.", "Which circle do you mean?", "It is blue.", "Hm."])
    tok, ctx = tiny_policy.tokenizer, tiny_policy.tokenizer.context_image_token_id
    assert tiny_policy.image_seq_length == 16  # (64 / 8)^2 patches x 0.5^2 after the pixel shuffle
    assert batch.pixel_values.shape == (int(batch.num_tiles.sum()), 3, 64, 64)
    assert ((batch.prompt_ids == ctx).sum(1) == batch.num_tiles * 16).all()
    assert (batch.prompt_mask[:, -1] == 1).all() and (batch.prompt_mask[:, 0] == 0).any()  # left padding
    assert (batch.completion_mask[:, 0] == 1).all() and (batch.completion_mask[:, -1] == 0).any()  # right padding
    lengths = batch.completion_mask.sum(1)
    assert (batch.completion_ids[torch.arange(4), lengths - 1] == tok.eos_token_id).all()
    assert tok.decode(batch.completion_ids[1, : lengths[1] - 1]) == "Which circle do you mean?"
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.position_ids.shape
    first = batch.attention_mask.argmax(1)
    assert (batch.position_ids[torch.arange(4), first] == 0).all()
    with pytest.raises(ValueError, match="2 completions for 4 items"):
        collate(tiny_policy, few_items, ["a", "b"])


def test_a_batch_without_completions_is_the_prompt(tiny_policy, few_items):
    batch = collate(tiny_policy, few_items)
    assert batch.completion_ids is None and batch.input_ids is batch.prompt_ids
    inputs = batch.model_inputs()
    assert torch.equal(inputs["input_ids"], batch.prompt_ids) and torch.equal(
        inputs["attention_mask"], batch.prompt_mask
    )
    assert batch.prompt_inputs().keys() == {"input_ids", "attention_mask", "pixel_values"}
    # left padding: every row's positions count from its first real token and end at its length - 1
    assert (inputs["position_ids"][:, -1] == batch.prompt_mask.sum(1) - 1).all()


def test_collate_refuses_no_items_and_a_template_without_the_placeholder(tiny_policy):
    with pytest.raises(ValueError, match="at least one item"):
        collate(tiny_policy, [])
    with pytest.raises(ValueError, match="renders no <nope> for an image part"):
        render_prompt(tiny_policy.tokenizer, "Which?", "<nope>", "<img></img>")


def test_load_rgb_converts_and_closes(tmp_path):
    Image.new("L", (5, 3), 128).save(tmp_path / "grey.png")
    image = load_rgb(str(tmp_path / "grey.png"))
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (128, 128, 128)
    (tmp_path / "grey.png").unlink()  # the file is closed: the loaded image does not need it
    assert image.getpixel((4, 2)) == (128, 128, 128)
