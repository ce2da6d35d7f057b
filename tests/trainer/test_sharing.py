"""A group's image encoded once and its prompt prefilled once: the same completions, log-probs, loss and gradients
as the one-image-per-row layout, and the same training run."""

import copy
import dataclasses

import pytest
import torch

from grpo_fast.config import build_config
from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.models import load_policy
from grpo_fast.models.generation import SeededSampler, generate_completions
from grpo_fast.models.inputs import collate, group_size
from grpo_fast.trainer import GRPOTrainer
from grpo_fast.trainer import loop as loop_module
from tests.models.tiny_qwen_vl import save_tiny_qwen_vl
from tests.trainer.test_loop import varied_reward

CPU = DistEnv(0, 1, torch.device("cpu"))
G = 4


def _per_row(batch_of_groups, policy, items):
    """The same rows in HF's layout: every row its own copy of its image."""
    plain = collate(policy, items)
    plain.completion_ids, plain.completion_mask = batch_of_groups.completion_ids, batch_of_groups.completion_mask
    return plain


def _unshared_collate(policy, items, completions=None, *, repeats=1):
    return collate(policy, [it for it in items for _ in range(repeats)], completions)


def test_collate_keeps_one_image_per_group(tiny_policy, few_items):
    shared = collate(tiny_policy, few_items, repeats=G)
    plain = collate(tiny_policy, [it for it in few_items for _ in range(G)])
    assert shared.pixel_values.shape[0] * G == plain.pixel_values.shape[0]
    assert shared.image_index.tolist() == [i for i in range(4) for _ in range(G)] and group_size(shared) == G
    assert plain.image_index is None and group_size(plain) == 1
    assert torch.equal(shared.prompt_ids, plain.prompt_ids) and torch.equal(shared.prompt_mask, plain.prompt_mask)
    for a, b in zip(shared.model_inputs().values(), plain.model_inputs().values(), strict=True):
        assert torch.equal(a, b)  # HF's layout rebuilt exactly
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        collate(tiny_policy, few_items, repeats=0)


@pytest.mark.parametrize("model", ["tiny", "qwen2_vl"])
def test_select_keeps_the_rows_and_only_their_images(model, few_items, tmp_path):
    """`Batch.select` of groups 1 and 3: each row's model inputs (its image's pixels included) as in the full batch,
    and only those two images kept."""
    policy = load_policy("tiny" if model == "tiny" else save_tiny_qwen_vl(tmp_path, model), seed=0)
    completions = [f"It is {c}." for c in ("red", "blue", "green", "yellow") for _ in range(G)]
    full = collate(policy, few_items, completions, repeats=G)
    rows = torch.tensor([*range(G, 2 * G), *range(3 * G, 4 * G)])
    picked = full.select(rows)
    assert picked.image_index.tolist() == [0] * G + [1] * G and group_size(picked) == G
    per_row = _unshared_collate(policy, few_items, completions, repeats=G)
    sizes = per_row.num_tiles if per_row.image_grid_thw is None else per_row.image_grid_thw.prod(-1)
    starts = (sizes.cumsum(0) - sizes).tolist()
    pixels = torch.cat([per_row.pixel_values[starts[r] : starts[r] + sizes[r]] for r in rows.tolist()])
    for key, value in picked.model_inputs().items():
        expected = pixels if key == "pixel_values" else full.model_inputs()[key][rows]
        assert torch.equal(value, expected), key
    assert picked.pixel_values.shape[0] * G == pixels.shape[0]  # one copy of each kept image


@pytest.mark.parametrize("model", ["tiny", "qwen2_vl", "qwen3_vl"])
def test_shared_generation_samples_the_same_completions(model, few_items, tmp_path):
    """InternVL: each group prefilled once (KV cache repeated G times); Qwen-VL: each image encoded once."""
    policy = load_policy("tiny" if model == "tiny" else save_tiny_qwen_vl(tmp_path, model), seed=0)
    shared = collate(policy, few_items, repeats=G)
    plain = collate(policy, [it for it in few_items for _ in range(G)])
    outs = [
        generate_completions(
            policy.model.eval(),
            batch,
            policy.tokenizer,
            max_new_tokens=12,
            logits_processor=SeededSampler(list(range(4 * G)), 1.0, 0, 1.0),
        )
        for batch in (shared, plain)
    ]
    assert torch.equal(outs[0].ids, outs[1].ids) and torch.equal(outs[0].mask, outs[1].mask)
    assert len({tuple(row) for row in outs[0].ids.tolist()}) > 4  # the group members sampled different completions


@pytest.mark.parametrize("model", ["tiny", "qwen2_vl", "qwen3_vl"])
def test_one_micro_batch_loss_and_gradients_equal_the_per_row_layout(model, synthetic_data, tmp_path):
    """fp32: log-probs (old, reference), loss and every parameter gradient of one GRPO micro-batch (beta > 0,
    num_iterations 2) with each image encoded once equal those of the per-row layout, up to the summation order of
    the G rows' gradients into one encoding."""
    cfg = build_config(
        {
            "batch_size": 8,
            "num_generations": G,
            "max_completion_length": 8,
            "beta": 0.1,
            "num_iterations": 2,
            "warm_start": False,
            "torch_threads": 1,
        }
    )
    policy = load_policy("tiny" if model == "tiny" else save_tiny_qwen_vl(tmp_path, model), seed=0)
    ref_model = copy.deepcopy(policy.model).requires_grad_(False)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer = GRPOTrainer(
        cfg, policy, load_seed(synthetic_data / "train.jsonl"), CPU, reward_funcs=[varied_reward], ref_model=ref_model
    )
    shared = trainer.rollout(0, 0)
    assert shared.batch.image_index is not None and shared.advantages.abs().max() > 0
    plain = dataclasses.replace(shared, batch=_per_row(shared.batch, policy, shared.items))
    for m in (policy.model, ref_model):
        torch.testing.assert_close(
            trainer.logprobs(m, shared.batch), trainer.logprobs(m, plain.batch), rtol=1e-6, atol=1e-6
        )
    plain.old_logp, plain.ref_logp = shared.old_logp, shared.ref_logp
    results = []
    for r in (shared, plain):
        policy.model.zero_grad(set_to_none=True)
        loss, _ = trainer.loss(r)
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
        )
    (loss_s, grads_s), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_s, loss_p, rtol=1e-6, atol=1e-7)
    assert grads_s.keys() == grads_p.keys() and any("vision" in n or "visual" in n for n in grads_s)
    # the shared layout sums each image's G rows of vision gradient in another order: entries near zero differ by
    # ~1e-7 (one in 16384 of the projector's on the synthetic data)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_short_run_equals_the_per_row_layout(synthetic_data, monkeypatch):
    """Three GRPO steps (beta > 0, two micro-batches) with shared images and prefill, and again with the per-row
    layout: the same completions, so the same metrics and weights up to float rounding."""
    cfg = build_config(
        {
            "batch_size": 8,
            "num_generations": G,
            "gradient_accumulation_steps": 2,
            "max_completion_length": 8,
            "beta": 0.04,
            "learning_rate": 1e-3,
            "warm_start": False,
            "torch_threads": 1,
        }
    )
    items = load_seed(synthetic_data / "train.jsonl")
    runs = []
    for unshared in (False, True):
        if unshared:
            monkeypatch.setattr(loop_module, "collate", _unshared_collate)
        policy = load_policy("tiny", seed=0)
        ref_model = copy.deepcopy(policy.model).requires_grad_(False)
        trainer = GRPOTrainer(cfg, policy, items, CPU, reward_funcs=[varied_reward], ref_model=ref_model)
        steps = []
        for _ in range(3):
            stats, rollouts = trainer.train_step()
            assert (rollouts[0].batch.image_index is None) == unshared
            steps.append((stats, torch.cat([r.batch.completion_ids.flatten() for r in rollouts])))
        runs.append((steps, dict(policy.model.named_parameters())))
    (steps_s, params_s), (steps_p, params_p) = runs
    for (a, ids_a), (b, ids_b) in zip(steps_s, steps_p, strict=True):
        assert torch.equal(ids_a, ids_b)
        assert a.time_generate > 0 and a.time_update > 0 and a.time_logprobs > 0
        for field in ("reward", "reward_std", "completion_length", "loss", "kl", "entropy", "clip_ratio", "grad_norm"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-5, abs=1e-7), field
    assert steps_s[-1][0].grad_norm > 0
    # atol 1% of the learning rate: Adam divides by sqrt(v), so where a gradient is ~0 the fp32 rounding of the G rows'
    # gradient sum (in one encoding here, over G copies there) becomes a visible step
    worst = max((params_s[name] - p).abs().max().item() for name, p in params_p.items())
    for name, p in params_p.items():
        torch.testing.assert_close(params_s[name], p, rtol=1e-4, atol=1e-5, msg=f"{name} (worst {worst:.2e})")
