"""Supervised warm start: teach the policy the format and wording of both behaviours before GRPO.

    python -m grpo_fast.sft                      # synthetic data, tiny model, 4-9 minutes on 2 CPU cores
    python -m grpo_fast.sft --data DIR --targets gold --model PATH --vision-steps 0

For a preset model (a vision tower from random weights) the vision tower is first pretrained on per-token object
labels of the synthetic scenes (`grpo_fast.sft.vision`, `--vision-steps`) and then frozen for the SFT.
Default targets are "mixed" (`grpo_fast.sft.targets`): for each item drawn, a coin flip independent of its level
picks a plain answer or a clarifying question (naming the readings when there are several), always true to the
scene. The policy thus learns how to answer and how to ask back, but not when; GRPO has to learn that from the
judge. A share `--describe` of the items become captioning and a share `--count` counting: perception tasks that
teach nothing about when to ask. `--targets gold` trains on the dataset's own answers instead. Writes to --out:
checkpoint/ (the policy and sft_config.json), loss.png (the loss curve) and metrics.json (final losses and the
sampled val reward).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from grpo_fast.config import MODEL_PRESETS, choices, option
from grpo_fast.data.splits import load_splits
from grpo_fast.data.synthetic import write_dataset
from grpo_fast.models.generation import SeededSampler, generate_completions
from grpo_fast.models.inputs import Batch, collate
from grpo_fast.models.policy import Policy, load_policy
from grpo_fast.plotting import Panel, Series, moving_average, plot_panels
from grpo_fast.rewards.judge import rubric_reward
from grpo_fast.rewards.rule_judge import RuleJudge
from grpo_fast.schedule import lr_factor
from grpo_fast.sft.targets import Targets, describe_share, sft_examples
from grpo_fast.sft.vision import pretrain_vision
from grpo_fast.threads import resolve_threads

TINY_VISION_STEPS = 2000


@dataclass
class SFTConfig:
    """SFT settings; the defaults are the tiny CPU warm start (2000 vision steps, then 1500 SFT steps at lr 1e-3:
    4-9 minutes on 2 cores)."""

    # data
    data: str | None = option(None, "folder with train.jsonl/val.jsonl; default: generate", "data")
    synthetic_items: int = option(2000, "synthetic items to generate when --data is not given", "data")
    skip_bad_lines: bool = option(False, "skip (and count) bad dataset lines", "data")
    targets: Targets = option("mixed", "mixed: answer/ask drawn per item; gold: the answers", "data")
    describe: float = option(0.1, "mixed only: share of items turned into captioning", "data")
    count: float = option(0.3, "mixed only: share of items turned into 'How many <noun>s do you see?'", "data")
    describe_end: float | None = option(
        None, "mixed only: captioning share at the last step, linear from --describe", "data"
    )
    # vision pretraining
    vision_steps: int | None = option(
        None,
        "vision pretraining steps before SFT (token labels of synthetic scenes; the tower is then frozen);"
        f" None: {TINY_VISION_STEPS} for a preset model (a tower from scratch), 0 for a checkpoint",
        "vision",
    )
    vision_batch_size: int = option(8, "images per vision pretraining step", "vision")
    vision_lr: float = option(2e-3, "peak learning rate of the vision pretraining", "vision")
    # model
    model: str = option("tiny", "preset name or InternVL -hf checkpoint folder", "model")
    # optimisation
    steps: int = option(1500, "optimizer steps", "optimization")
    batch_size: int = option(16, "items per step", "optimization")
    lr: float = option(1e-3, "peak learning rate", "optimization")
    warmup: int = option(20, "linear warm-up steps, then cosine decay to 10%", "optimization")
    weight_decay: float = option(0.01, "AdamW weight decay", "optimization")
    seed: int = option(0, "seed of data, init, shuffling and targets", "optimization")
    threads: int = option(0, "torch CPU threads (0: auto, one per core other processes leave idle)", "optimization")
    # output
    out: str = option("runs/sft", "output folder", "output")
    eval_items: int = option(64, "val items for the final loss and sampled reward (0: skip)", "output")
    max_new_tokens: int = option(40, "completion limit when sampling val replies", "output")


def resolved_vision_steps(cfg: SFTConfig) -> int:
    """`cfg.vision_steps`, or when None its default: pretrain a preset model's tower (from scratch), not a
    checkpoint's."""
    if cfg.vision_steps is not None:
        return cfg.vision_steps
    return TINY_VISION_STEPS if cfg.model in MODEL_PRESETS else 0


def _examples(
    cfg: SFTConfig, items: list[dict[str, Any]], rng: random.Random, step: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """(items, target replies) of SFT step `step`, with that step's task mix."""
    caption = describe_share(step, steps=cfg.steps, start=cfg.describe, end=cfg.describe_end)
    return sft_examples(items, rng, targets=cfg.targets, caption_share=caption, count_share=cfg.count)


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Both stages' learning-rate multiplier: linear warm-up (the peak on its last step), cosine to 10%."""
    return partial(lr_factor, total=total, warmup=warmup, kind="cosine", floor=0.1, peak_in_warmup=True)


def completion_loss(policy: Policy, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of the completion tokens given prompt and image."""
    width = batch.completion_ids.shape[1]
    # Only the last C + 1 positions are projected to the vocabulary: position P - 1 + j predicts completion token j.
    logits = policy.model(**batch.model_inputs(), logits_to_keep=width + 1).logits[:, :-1]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.completion_ids.flatten(), reduction="none")
    mask = batch.completion_mask.flatten().float()
    return (nll * mask).sum() / mask.sum()


@torch.no_grad()
def sampled_val_reward(policy: Policy, items: list[dict[str, Any]], max_new_tokens: int, seed: int) -> dict[str, float]:
    """Mean rule-judge reward of one sampled reply (temperature 1, row i seeded by `seed` and i) per item, overall
    and per level; share of asks."""
    seeds = [random.Random(f"{seed}/val/{i}").getrandbits(63) for i in range(len(items))]
    out = generate_completions(
        policy.model,
        collate(policy, items),
        policy.tokenizer,
        max_new_tokens=max_new_tokens,
        logits_processor=SeededSampler(seeds, temperature=1.0, top_k=0, top_p=1.0),
    )
    replies = policy.tokenizer.batch_decode(out.ids, skip_special_tokens=True)
    rewards = [rubric_reward(j) for j in RuleJudge().judge(items, replies)]
    stats = {"val_reward": sum(rewards) / len(rewards)}
    for level in ("ambig", "unambig"):
        rs = [r for r, it in zip(rewards, items) if it["level"] == level]
        stats[f"val_reward/{level}"] = sum(rs) / max(len(rs), 1)
    stats["val_ask_rate"] = sum("?" in r for r in replies) / len(replies)
    return stats


def _load_data(cfg: SFTConfig, out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    folder = Path(cfg.data) if cfg.data else out / "data"
    if cfg.data is None:
        write_dataset(folder, cfg.synthetic_items, cfg.seed)
    train, val = load_splits(folder, skip_bad_lines=cfg.skip_bad_lines, val_required=False)
    if cfg.targets == "mixed" and any(it.get("scene") is None or it.get("target") is None for it in train):
        raise ValueError("--targets mixed needs synthetic items (with scene and target); use --targets gold")
    return train, val


def _plot(losses: list[float], path: Path) -> None:
    series = [Series(range(len(losses)), losses, "train (per step)", alpha=0.5)]
    window = 20
    if len(losses) >= window:
        series.append(moving_average(losses, window))
    plot_panels(path, [Panel("SFT warm start", "step", "completion loss (nats/token)", series, yscale="log")])


def train(cfg: SFTConfig) -> dict[str, float]:
    """Runs SFT as configured and writes checkpoint/, loss.png and metrics.json under `cfg.out`."""
    if cfg.targets not in choices(Targets):
        raise ValueError(f"targets must be one of {', '.join(choices(Targets))}; got {cfg.targets!r}")
    shares = (cfg.describe, cfg.describe if cfg.describe_end is None else cfg.describe_end, cfg.count)
    if min(shares) < 0 or max(shares[:2]) + cfg.count > 1:
        raise ValueError(f"describe, describe_end and count must be >= 0 with describe + count <= 1, got {shares}")
    if min(cfg.steps, cfg.batch_size, cfg.vision_batch_size) < 1:
        raise ValueError(
            f"steps, batch_size and vision_batch_size must be >= 1, got {cfg.steps}, {cfg.batch_size} and "
            f"{cfg.vision_batch_size}"
        )
    vision_steps = resolved_vision_steps(cfg)
    if vision_steps < 0:
        raise ValueError(f"vision_steps must be >= 0, got {vision_steps}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_items, val_items = _load_data(cfg, out)
    if vision_steps > 0 and any(it.get("scene") is None for it in train_items):
        raise ValueError("vision pretraining needs synthetic items (with scene); pass --vision-steps 0")
    torch.set_num_threads(resolve_threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.model, seed=cfg.seed)
    policy.model.train()
    metrics: dict[str, float] = {}
    if vision_steps > 0:
        start = time.perf_counter()
        metrics |= pretrain_vision(
            policy,
            train_items,
            val_items[: cfg.eval_items],
            vision_steps,
            cfg.vision_batch_size,
            cfg.vision_lr,
            _schedule(vision_steps, cfg.warmup),
            cfg.seed,
        )
        metrics["vision_seconds"] = time.perf_counter() - start
        policy.model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.steps, cfg.warmup))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    for step in (bar := tqdm(range(cfg.steps), desc="sft", unit="step")):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(train_items)), len(train_items))
        items = [train_items[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        loss = completion_loss(policy, collate(policy, *_examples(cfg, items, rng, step)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    metrics |= {
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "train_seconds": time.perf_counter() - start,
    }
    policy.model.eval()
    if val_items and cfg.eval_items > 0:
        val = val_items[: cfg.eval_items]
        with torch.no_grad():
            batch = collate(policy, *_examples(cfg, val, rng, cfg.steps - 1))  # the last step's task mix
            metrics["val_loss"] = completion_loss(policy, batch).item()
        metrics |= sampled_val_reward(policy, val, cfg.max_new_tokens, cfg.seed)
    policy.save(out / "checkpoint")
    (out / "checkpoint" / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    _plot(losses, out / "loss.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
