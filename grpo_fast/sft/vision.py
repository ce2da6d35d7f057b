"""Vision pretraining of the tiny InternVL's tower: every image token learns which object lies under it.

Real VLMs start SFT from a pretrained vision encoder; the tiny model's starts from random weights. Through the
language loss alone it learned colour within the SFT budget but not shape (shape words of captions cost 1.41
nats/token with the item's image and 1.40 with another item's, i.e. ln 4: the tower did not see shape), so the
policy could not tell which objects a question is about. This stage trains the vision tower and projector with
linear heads on the image features the language model reads: shape, colour and size of the object under each
token (or background), and on the thumbnail how many objects share that object's shape (labels from
`grpo_fast.data.token_labels`), on the training images. The SFT then keeps the tower frozen: with the language
loss on it, the features were lost again within 700 steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from grpo_fast.data.scene import Scene
from grpo_fast.data.token_labels import NUM_CLASSES, token_labels
from grpo_fast.models.inputs import load_rgb
from grpo_fast.models.policy import Policy

ATTRIBUTES = tuple(NUM_CLASSES)  # ("shape", "colour", "size", "count"): the columns of token_labels


def _vision_batch(policy: Policy, items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles `[N, 3, t, t]` of the items' images and their tokens' labels `[N * tokens per tile, 4]`."""
    side = int(policy.image_seq_length**0.5)
    tiles, labels = [], []
    for it in items:
        tiled = policy.tiling.tile(load_rgb(it["image"]))
        tiles.append(tiled.pixel_values)
        labels.append(token_labels(Scene.from_dict(it["scene"]), tiled.grid, len(tiled.pixel_values), side))
    return torch.cat(tiles), torch.cat(labels)


def _logits(policy: Policy, heads: torch.nn.Linear, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Per attribute, `[N * tokens per tile, classes]` logits of the image tokens."""
    features = policy.model.model.get_image_features(pixel_values=pixel_values).pooler_output
    logits = heads(features.flatten(0, 1))
    return list(logits.split(list(NUM_CLASSES.values()), dim=-1))


def _losses(logits: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy per attribute; "count" only where it is labelled (thumbnail tokens on an object), if anywhere."""
    losses = []
    for k, (name, lg) in enumerate(zip(ATTRIBUTES, logits)):
        if name != "count":
            losses.append(F.cross_entropy(lg, labels[:, k]))
        elif labels[:, k].any():  # images of one tile have no thumbnail
            losses.append(F.cross_entropy(lg, labels[:, k], ignore_index=0))
    return losses


def pretrain_vision(
    policy: Policy,
    train_items: list[dict[str, Any]],
    val_items: list[dict[str, Any]],
    steps: int,
    batch_size: int,
    lr: float,
    lr_factor: Callable[[int], float],
    seed: int,
) -> dict[str, float]:
    """Trains `policy`'s vision tower and projector on token labels; returns losses and val accuracy per attribute.

    Items need `scene` (synthetic data). Accuracy counts the labelled tokens: those on an object (for "count", those
    of the thumbnail on an object).
    """
    if policy.tiling is None:
        raise ValueError("vision pretraining needs an InternVL policy (the tiny model)")
    model = policy.model.model
    heads = torch.nn.Linear(policy.model.config.text_config.hidden_size, sum(NUM_CLASSES.values()))
    params = [*model.vision_tower.parameters(), *model.multi_modal_projector.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = random.Random(seed)
    losses = []
    for _ in (bar := tqdm(range(steps), desc="vision", unit="step")):
        pixel_values, labels = _vision_batch(policy, rng.sample(train_items, min(batch_size, len(train_items))))
        loss = sum(_losses(_logits(policy, heads, pixel_values), labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    metrics = {"vision_loss_first": losses[0], "vision_loss_last": losses[-1]} if losses else {}
    if val_items:
        with torch.no_grad():
            pixel_values, labels = _vision_batch(policy, val_items)
            for k, lg in enumerate(_logits(policy, heads, pixel_values)):
                labelled = labels[:, k] > 0  # on an object (and for "count", on the thumbnail)
                if labelled.any():
                    hits = lg[labelled].argmax(-1) == labels[labelled, k]
                    metrics[f"vision_val_acc/{ATTRIBUTES[k]}"] = hits.float().mean().item()
    return metrics
