"""Data parallelism over torch.distributed (gloo on CPU, nccl on GPU), started by `torchrun`; no-ops alone.

Each rank rolls out its shard of the global batch of prompts; rewards are all-gathered so advantages are computed
over whole groups and the whole batch (batch-std scaling sees every reward), gradients are summed across ranks
(the loss is already normalised by global counts, see `GRPOTrainer.loss_scales`), and only rank 0 writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place: `rank` of `world` processes, and the device it computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistEnv:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a world of one."""
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_cat(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The ranks' equally shaped tensors concatenated along dim 0, in rank order."""
    if env.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(env.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The elementwise sum over ranks (a new tensor)."""
    x = x.clone()
    if env.world > 1:
        dist.all_reduce(x)
    return x


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    if env.world == 1:
        return [obj]
    out: list[Any] = [None] * env.world
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
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()
