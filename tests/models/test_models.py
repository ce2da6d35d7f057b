"""Tiny InternVL, its tokenizer, and load_policy on presets, InternVL -hf and Qwen-VL checkpoints."""

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from grpo_fast.config import MODEL_PRESETS
from grpo_fast.models import PRESETS, Tiling, build_tokenizer, load_policy
from grpo_fast.models.generation import suppressed_ids
from grpo_fast.models.inputs import collate
from tests.models.tiny_qwen_vl import save_tiny_qwen_vl


def test_the_config_knows_every_model_preset():
    assert MODEL_PRESETS == tuple(PRESETS)


def test_tokenizer_round_trip_and_special_tokens(tiny_policy):
    tok = tiny_policy.tokenizer
    for text in ["There are two small triangles: a red one and a blue one. Which one do you mean?", "héllo, 😀 42!"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # the generator's words are single tokens: the vocabulary stays small
    assert len(tok(" triangle is purple", add_special_tokens=False)["input_ids"]) == 3
    for special in ["<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>"]:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert tiny_policy.model.config.text_config.vocab_size == len(tok) == 400


def test_forward_exposes_hidden_states_and_lm_head_and_generates(tiny_policy, few_items):
    batch = collate(tiny_policy, few_items, ["The circle is red."] * 4)
    with torch.no_grad():
        out = tiny_policy.model(**batch.model_inputs(), output_hidden_states=True)
        hidden, weight = out.hidden_states[-1], tiny_policy.model.get_output_embeddings().weight
        torch.testing.assert_close(hidden @ weight.T, out.logits)
        prompts = collate(tiny_policy, few_items)
        generated = tiny_policy.model.generate(
            input_ids=prompts.prompt_ids,
            attention_mask=prompts.prompt_mask,
            pixel_values=prompts.pixel_values,
            max_new_tokens=5,
            do_sample=True,
        )
    assert out.logits.shape == (4, batch.input_ids.shape[1], 400)
    assert generated.shape[0] == 4 and 1 <= generated.shape[1] - prompts.prompt_ids.shape[1] <= 5
    assert 0.5e6 < sum(p.numel() for p in tiny_policy.model.parameters()) < 5e6


def test_save_and_load_round_trip(tiny_policy, few_items, tmp_path):
    tiny_policy.save(tmp_path)
    loaded = load_policy(tmp_path)
    assert loaded.tiling == tiny_policy.tiling and loaded.image_seq_length == 16
    assert loaded.tokenizer.context_image_token_id == tiny_policy.tokenizer.context_image_token_id
    batch = collate(tiny_policy, few_items[:2], ["It is red.", "Which one?"])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(**batch.model_inputs()).logits, tiny_policy.model(**batch.model_inputs()).logits
        )


def test_loads_an_hf_internvl_checkpoint_folder(few_items, tmp_path):
    """A randomly initialised small config of the real -hf class, with another tile and patch size."""
    tok = build_tokenizer(["What colour is the circle?"], vocab_size=300)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=56,
            patch_size=14,
        ).to_dict(),
        text_config=Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ).to_dict(),
        image_token_id=tok.context_image_token_id,
        image_seq_length=4,
    )
    InternVLForConditionalGeneration(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    Tiling(56, 1, 6, True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).image_processor().save_pretrained(tmp_path)
    loaded = load_policy(tmp_path)
    assert loaded.tiling == Tiling(56, 1, 6, True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert loaded.image_seq_length == 4  # (56 / 14)^2 x 0.25
    batch = collate(loaded, few_items[:2])
    assert batch.pixel_values.shape[-1] == 56
    with torch.no_grad():
        assert loaded.model(**batch.model_inputs()).logits.shape[:2] == batch.input_ids.shape


def test_unknown_or_foreign_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model': not a preset \\(tiny\\)"):
        load_policy("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):  # no config.json: transformers names the folder
        load_policy(tmp_path / "empty")
    Qwen2Config(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a 'qwen2' model; supported: InternVL \\(-hf\\), qwen2_vl"):
        load_policy(tmp_path)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_checkpoint_collates_generates_and_scores_like_generate(model_type, few_items, tmp_path):
    """Image tokens expanded per image grid, left-padded prompts; the prompt + completion forward (3-D rope positions
    derived by the model from the image grids and the mask) gives the logits generate sampled from."""
    policy = load_policy(save_tiny_qwen_vl(tmp_path / "ckpt", model_type))
    assert policy.model.config.model_type == model_type
    assert type(policy.model).__name__.endswith("ForConditionalGeneration")
    assert policy.tiling is None and policy.image_processor.merge_size == 2
    batch = collate(policy, few_items)
    grid = batch.image_grid_thw
    assert grid.shape == (4, 3) and batch.pixel_values.shape == (int(grid.prod(-1).sum()), 3 * 2 * 8 * 8)
    assert (batch.image_token_mask.sum(1) == grid.prod(-1) // 4).all()  # 2 x 2 patches -> one token
    assert torch.equal(batch.image_token_mask, (batch.prompt_ids == policy.image_token_id).long())
    assert (batch.prompt_mask[:, -1] == 1).all() and (batch.prompt_mask[:, 0] == 0).any()  # left padding
    with torch.no_grad():
        out = policy.model.generate(
            **batch.prompt_inputs(),
            max_new_tokens=5,
            min_new_tokens=5,
            suppress_tokens=suppressed_ids(policy.tokenizer),  # no image token in a completion
            output_logits=True,
            return_dict_in_generate=True,
        )
        batch.completion_ids = out.sequences[:, batch.prompt_ids.shape[1] :]
        batch.completion_mask = torch.ones_like(batch.completion_ids)
        inputs = batch.model_inputs()
        assert "position_ids" not in inputs and inputs["mm_token_type_ids"].shape == batch.input_ids.shape
        logits = policy.model(**inputs).logits[:, -6:-1]
    torch.testing.assert_close(logits, torch.stack(out.logits, 1), rtol=1e-4, atol=1e-5)
    policy.save(tmp_path / "saved")
    loaded = load_policy(tmp_path / "saved")
    assert loaded.image_processor.to_dict() == policy.image_processor.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits[:, -6:-1], logits)
