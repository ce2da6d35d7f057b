"""Data parallelism over torch.distributed (gloo on CPU; nccl and gloo on GPU), started by `torchrun`; no-ops alone.

Each rank rolls out its shard of the global batch of prompts; rewards are all-gathered so advantages are computed
over whole groups and the whole batch (batch-std scaling sees every reward), gradients are summed across ranks
(the loss is already normalised by global counts, see `GRPOTrainer.loss_scales`), and only rank 0 writes.
With `--fsdp` the model is sharded with FSDP2 (`shard`); checkpoints then gather the full weights and optimizer
state to rank 0 (`full_state`) and every rank takes its shards back from them on resume (`load_full_state`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class DistEnv:
    """This process's place: `rank` of `world` processes, and the device it computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(device_type: str) -> str:
    """The process group's backend for a policy on `device_type`. On CUDA, nccl for the tensors on the GPU
    (gradients, FSDP2's shards) and gloo for those every step keeps on the CPU (rewards, loss-normaliser counts,
    metric sums, judge counters): an nccl-only group rejects them ("No backend type associated with device type
    cpu"). Elsewhere gloo alone."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init(timeout_s: float | None = None) -> DistEnv:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a world of one. `timeout_s`:
    how long a collective waits for the other ranks before it fails (None: torch's default, 30 minutes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world == 1:
        return DistEnv(0, 1, device)
    if not dist.is_initialized():
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(process_group_backend(device.type), timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), device)


class CollectiveError(RuntimeError):
    """A collective failed: another rank died, hung past the process group's timeout, or cannot be reached."""


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turns the RuntimeError of a failed collective (gloo: "Connection closed by peer", "Timed out ...") into a
    one-line CollectiveError that names this rank and the way forward."""
    try:
        yield
    except RuntimeError as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        detail = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0]  # without gloo's "[file.cc:553] "
        raise CollectiveError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} failed ({detail}): another rank has "
            "stopped or hangs, see its output; --resume continues from the last checkpoint"
        ) from e


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_cat(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The ranks' equally shaped tensors concatenated along dim 0, in rank order."""
    if env.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(env.world)]
    with _collective("all_gather"):
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The elementwise sum over ranks (a new tensor)."""
    x = x.clone()
    if env.world > 1:
        with _collective("all_reduce"):
            dist.all_reduce(x)
    return x


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    if env.world == 1:
        return [obj]
    out: list[Any] = [None] * env.world
    with _collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def sum_gradients(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Sums `.grad` over ranks in place (one flat all-reduce)."""
    if env.world == 1:
        return
    for p in params:  # a parameter without a gradient here may have one on another rank
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    with _collective("the gradient all_reduce"):
        dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        with _collective("barrier"):
            dist.barrier()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clips the gradients' global norm to `max_norm` (0: no clipping) and returns the norm before clipping; a
    collective for sharded parameters (the norm is over every rank's shard)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def shard(model: torch.nn.Module) -> None:
    """FSDP2 over all processes: each transformer block HF lists in `_no_split_modules` (decoder layers, vision
    blocks) is a unit of its own, gathered just for its forward and backward; the root unit holds the rest
    (embeddings, projector, final norm, lm_head: tied weights stay together). The root's forward must wrap every
    use of its weights: log-probs come from the root's hidden states, and `generate` (which runs the vision
    encoder and embeddings before its first forward) and `get_image_features` (a group's image encoded once, before
    the forward that shares its features: `grpo_fast.models.inputs.image_features`) are registered as forward
    methods of the root.
    Gradients are summed over ranks, not averaged: the loss is already normalised by global counts."""
    blocks = set(model._no_split_modules or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    register_fsdp_forward_method(model, "generate")
    register_fsdp_forward_method(model, "get_image_features")
    for module in model.modules():
        if isinstance(module, FSDPModule):  # a plain SUM reduce-scatter (gloo has no pre-multiplied sum)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a sharded model on rank 0's CPU (other ranks get an empty dict); a collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, optimizer state dict) to checkpoint, on CPU. `sharded` (FSDP2): a collective that
    gathers the full weights and optimizer state to rank 0."""
    if sharded:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return full_weights(model), get_optimizer_state_dict(model, optimizer, options=full)
    weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, optimizer.state_dict()


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    *,
    sharded: bool,
) -> None:
    """Loads what `full_state` returned; `sharded`: every rank reads the full state and keeps its own shards."""
    if sharded:
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=full)
        return
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint weights do not match the model (e.g. {missing[0]!r})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state)
