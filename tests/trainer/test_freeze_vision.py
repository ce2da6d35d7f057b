"""freeze_vision_tower: a GRPO step moves the language model and the projector and leaves every weight of the
vision tower as it was, for the tiny InternVL, a tiny Qwen-VL (its tower is `visual`, merger included) and LoRA
adapters."""

import pytest
import torch

from grpo_fast.config import build_config
from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv
from grpo_fast.trainer import GRPOTrainer
from grpo_fast.trainer.setup import build_policy
from tests.models.tiny_qwen_vl import save_tiny_qwen_vl
from tests.trainer.rewards import varied_reward

CPU = DistEnv(0, 1, torch.device("cpu"))


@pytest.mark.parametrize("model, lora", [("tiny", 0), ("qwen2_vl", 0), ("tiny", 4)])
def test_step_leaves_the_vision_tower_alone(synthetic_data, tmp_path, model, lora):
    if lora:
        pytest.importorskip("peft")
    source = "tiny" if model == "tiny" else str(save_tiny_qwen_vl(tmp_path, model))
    flags = {"batch_size": 8, "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-2}
    cfg = build_config(flags | {"warm_start": False, "torch_threads": 1, "lora": lora, "freeze_vision_tower": True})
    policy, ref_model = build_policy(cfg, source, CPU)
    tower = policy.model.get_encoder(modality="image")
    assert list(tower.parameters()) and not any(p.requires_grad for p in tower.parameters())
    before_tower = {n: p.detach().clone() for n, p in tower.named_parameters()}
    trainable = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    trainer = GRPOTrainer(cfg, policy, load_seed(synthetic_data / "train.jsonl"), CPU, reward_funcs=[varied_reward],
                          ref_model=ref_model)
    _, (rollout,) = trainer.train_step()

    assert rollout.advantages.abs().max() > 0
    assert all(torch.equal(p, before_tower[n]) for n, p in tower.named_parameters())
    moved = [n for n, p in policy.model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert moved  # the language model (or its adapters) took the update
    if model == "tiny" and not lora:  # InternVL's projector sits outside the tower and is trained
        assert any("multi_modal_projector" in n for n in moved)
