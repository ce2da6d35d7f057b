"""Supervised warm start: teach the policy the format and wording of both behaviours before GRPO.

    python -m grpo_fast.sft                      # synthetic data, tiny model, ~7 minutes on 2 CPU cores
    python -m grpo_fast.sft --data DIR --targets gold --model PATH --vision-steps 0

For a preset model (a vision tower from random weights) the vision tower is first pretrained on per-token object
labels of the synthetic scenes (`grpo_fast.sft_vision`, `--vision-steps`) and then frozen for the SFT.
Default targets are "mixed": for each item drawn, a coin flip independent of its level picks a plain answer
or a clarifying question (naming the readings when there are several), always true to the scene. The
policy thus learns how to answer and how to ask back, but not when; GRPO has to learn that from the judge.
A share `--describe` of the items become captioning ("What do you see in the picture?": every object, left
to right) and a share `--count` become counting ("How many circles do you see?" -> "I see two circles: a red
one and a blue one."): perception tasks that teach nothing about when to ask.
`--targets gold` trains on the dataset's own answers instead. Writes to --out: checkpoint/ (the policy and
sft_config.json), loss.png (the loss curve) and metrics.json (final losses and the sampled val reward).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from grpo_fast.data.collate import Batch, collate
from grpo_fast.data.phrasing import DESCRIBE_QUESTION, count_question, count_reply, describe, warm_start_reply
from grpo_fast.data.scene import Scene, Target
from grpo_fast.data.seed import load_seed
from grpo_fast.data.synthetic import generate
from grpo_fast.models.policy import PRESETS as MODEL_PRESETS
from grpo_fast.models.policy import Policy, load_policy
from grpo_fast.rewards.judge import rubric_reward
from grpo_fast.rewards.rule_judge import RuleJudge
from grpo_fast.sft_vision import pretrain_vision

TARGETS = ("mixed", "gold")
TINY_VISION_STEPS = 2000


@dataclass
class SFTConfig:
    """SFT settings; the defaults are the tiny CPU warm start (2000 vision steps, then 900 SFT steps: ~7 minutes on
    2 cores)."""

    # data
    data: str | None = field(default=None, metadata={"help": "folder with train.jsonl/val.jsonl; default: generate"})
    n: int = field(default=2000, metadata={"help": "synthetic items to generate when --data is not given"})
    skip_bad_lines: bool = field(default=False, metadata={"help": "skip (and count) bad dataset lines"})
    targets: str = field(default="mixed", metadata={"help": "mixed: answer/ask drawn per item; gold: the answers"})
    describe: float = field(default=0.1, metadata={"help": "mixed only: share of items turned into captioning"})
    count: float = field(
        default=0.3, metadata={"help": "mixed only: share of items turned into 'How many <noun>s do you see?'"}
    )
    describe_end: float | None = field(
        default=None, metadata={"help": "mixed only: captioning share at the last step, linear from --describe"}
    )
    vision_steps: int | None = field(
        default=None,
        metadata={
            "help": "vision pretraining steps before SFT (token labels of synthetic scenes; the tower is then frozen);"
            f" None: {TINY_VISION_STEPS} for a preset model (a tower from scratch), 0 for a checkpoint"
        },
    )
    vision_batch_size: int = field(default=8, metadata={"help": "images per vision pretraining step"})
    vision_lr: float = field(default=2e-3, metadata={"help": "peak learning rate of the vision pretraining"})
    # model
    model: str = field(default="tiny", metadata={"help": "preset name or InternVL -hf checkpoint folder"})
    # optimisation
    steps: int = field(default=900, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "items per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (tiny model from scratch: high)"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps, then cosine decay to 10%"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seed of data, init, shuffling and targets"})
    # The tiny model's ops are too small to gain from more threads, and on a shared CPU OpenMP's spinning made
    # 2 threads ~25x slower than 1 here (12 steps: 93 s vs 3.6 s at a load of 8 on 2 cores).
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    # output
    out: str = field(default="runs/sft", metadata={"help": "output folder"})
    eval_items: int = field(default=64, metadata={"help": "val items for the final loss and sampled reward (0: skip)"})
    max_new_tokens: int = field(default=40, metadata={"help": "completion limit when sampling val replies"})


def resolved_vision_steps(cfg: SFTConfig) -> int:
    """`cfg.vision_steps`, or when None its default: pretrain a preset model's tower (from scratch), not a checkpoint's."""
    if cfg.vision_steps is not None:
        return cfg.vision_steps
    return TINY_VISION_STEPS if cfg.model in MODEL_PRESETS else 0


def describe_share(step: int, cfg: SFTConfig) -> float:
    """The captioning share at `step`: `cfg.describe`, moving linearly to `cfg.describe_end` when that is set."""
    if cfg.describe_end is None:
        return cfg.describe
    return cfg.describe + (cfg.describe_end - cfg.describe) * step / max(cfg.steps - 1, 1)


def _examples(
    items: list[dict[str, Any]], cfg: SFTConfig, rng: random.Random, step: int = 0
) -> tuple[list[dict[str, Any]], list[str]]:
    """(items, target replies) for one step; in mixed mode a share `describe_share` become captioning examples."""
    if cfg.targets == "gold":
        return items, [it["answer"] for it in items]
    share = describe_share(step, cfg)
    out_items, replies = [], []
    for it in items:
        scene = Scene.from_dict(it["scene"])
        draw = rng.random()
        if draw < share:
            out_items.append(it | {"question": DESCRIBE_QUESTION})
            replies.append(describe(scene))
        elif draw < share + cfg.count:
            target = Target(**it["target"])
            out_items.append(it | {"question": count_question(target)})
            replies.append(count_reply(scene, target))
        else:
            out_items.append(it)
            replies.append(warm_start_reply(scene, Target(**it["target"]), rng))
    return out_items, replies


def completion_loss(policy: Policy, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of the completion tokens given prompt and image."""
    width = batch.completion_ids.shape[1]
    # Only the last C + 1 positions are projected to the vocabulary: position P - 1 + j predicts completion token j.
    logits = policy.model(**batch.model_inputs(), logits_to_keep=width + 1).logits[:, :-1]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.completion_ids.flatten(), reduction="none")
    mask = batch.completion_mask.flatten().float()
    return (nll * mask).sum() / mask.sum()


@torch.no_grad()
def sampled_val_reward(policy: Policy, items: list[dict[str, Any]], max_new_tokens: int) -> dict[str, float]:
    """Mean rule-judge reward of one sampled reply (temperature 1) per item, overall and per level; share of asks."""
    batch = collate(policy, items)
    out = policy.model.generate(
        input_ids=batch.prompt_ids,
        attention_mask=batch.prompt_mask,
        pixel_values=batch.pixel_values,
        max_new_tokens=max_new_tokens,
        do_sample=True,
    )
    replies = policy.tokenizer.batch_decode(out[:, batch.prompt_ids.shape[1] :], skip_special_tokens=True)
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
        generate(folder, cfg.n, cfg.seed)
    elif not (folder / "train.jsonl").is_file():
        raise ValueError(f"data folder {folder} has no train.jsonl (expected train.jsonl and val.jsonl)")
    train = load_seed(folder / "train.jsonl", skip_bad_lines=cfg.skip_bad_lines)
    val = load_seed(folder / "val.jsonl", skip_bad_lines=cfg.skip_bad_lines) if (folder / "val.jsonl").is_file() else []
    if cfg.targets == "mixed" and any(it.get("scene") is None or it.get("target") is None for it in train):
        raise ValueError("--targets mixed needs synthetic items (with scene and target); use --targets gold")
    return train, val


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier at `step` of `steps`: linear warm-up over `warmup` steps, then cosine to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _plot(losses: list[float], path: Path) -> None:
    fig = Figure(figsize=(6, 3.5))  # no pyplot: no GUI backend, nothing global
    ax = fig.subplots()
    ax.plot(losses, lw=0.8, alpha=0.5, label="train (per step)")
    window = 20
    if len(losses) >= window:
        smooth = [sum(losses[i - window : i]) / window for i in range(window, len(losses) + 1)]
        ax.plot(range(window - 1, len(losses)), smooth, label=f"train ({window}-step mean)")
    ax.set(xlabel="step", ylabel="completion loss (nats/token)", yscale="log", title="SFT warm start")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def train(cfg: SFTConfig) -> dict[str, float]:
    """Runs SFT as configured and writes checkpoint/, loss.png and metrics.json under `cfg.out`."""
    if cfg.targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {cfg.targets!r}")
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
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
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
            lambda s: lr_factor(s, vision_steps, cfg.warmup),
            cfg.seed,
        )
        metrics["vision_seconds"] = time.perf_counter() - start
        policy.model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    for step in (bar := tqdm(range(cfg.steps), desc="sft", unit="step")):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(train_items)), len(train_items))
        items = [train_items[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        loss = completion_loss(policy, collate(policy, *_examples(items, cfg, rng, step)))
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
            batch = collate(policy, *_examples(val, cfg, rng, cfg.steps - 1))  # the last step's task mix
            metrics["val_loss"] = completion_loss(policy, batch).item()
        metrics |= sampled_val_reward(policy, val, cfg.max_new_tokens)
    policy.save(out / "checkpoint")
    (out / "checkpoint" / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    _plot(losses, out / "loss.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _optional(kind: type) -> Callable[[str], Any]:
    """An argparse type that reads "none" (or nothing) as None, else `kind`."""

    def parse(value: str) -> Any:
        return None if value.lower() in ("none", "") else kind(value)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def parse_args(argv: list[str] | None = None) -> SFTConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    groups: dict[str, argparse._ArgumentGroup] = {}
    sections = {
        "data": "data",
        "n": "data",
        "skip_bad_lines": "data",
        "targets": "data",
        "describe": "data",
        "model": "model",
    }
    for f in dataclasses.fields(SFTConfig):
        group = groups.setdefault(
            sections.get(f.name, "training"), parser.add_argument_group(sections.get(f.name, "training"))
        )
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help strings ("10%" broke --help)
        if f.type == "bool":
            group.add_argument(flag, action="store_true", help=help_text)
        else:
            kinds = {"int": int, "float": float, "int | None": _optional(int), "float | None": _optional(float)}
            kind = kinds.get(f.type, str)
            group.add_argument(flag, type=kind, default=f.default, help=help_text + f" (default: {f.default})")
    return SFTConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    print("sft config:", json.dumps(dataclasses.asdict(cfg)))
    try:
        metrics = train(cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    print(f"checkpoint: {Path(cfg.out) / 'checkpoint'}  loss curve: {Path(cfg.out) / 'loss.png'}")


if __name__ == "__main__":
    main()
