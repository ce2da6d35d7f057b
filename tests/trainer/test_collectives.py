"""The trainer's collectives against the process group's backend: every tensor a step, an evaluation and the
judge's counters send through torch.distributed must be on a device the backend serves.

On CUDA the policy's tensors (gradients, FSDP2's shards) are on the GPU but rewards, loss-normaliser counts,
metric sums and judge counters stay on the CPU, which an nccl-only group rejects at step 1 ("No backend type
associated with device type cpu"). No GPU is needed to catch that: the test asks `grpo_fast.distributed.init` for
its group as if CUDA were there, builds a gloo group in its place (gloo runs the collectives on 2 CPU processes),
and checks every tensor against the backend init asked for."""

import os
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_fast import distributed
from grpo_fast.config import build_config
from grpo_fast.data import load_seed
from grpo_fast.distributed import DistEnv, process_group_backend
from grpo_fast.rewards import RuleJudge
from grpo_fast.trainer import GRPOTrainer
from grpo_fast.trainer.evaluation import evaluate
from grpo_fast.trainer.loop import judge_metrics

TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


def served_devices(backend: str) -> set[str]:
    """The device types a backend string serves: "cpu:gloo,cuda:nccl" -> {cpu, cuda}; "nccl" -> {cuda}."""
    if ":" in backend:
        return {pair.split(":")[0] for pair in backend.split(",")}
    return set(dist.Backend.backend_capability[backend])


def test_process_group_backend():
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"
    assert served_devices(process_group_backend("cuda")) == {"cpu", "cuda"}


class CountingJudge(RuleJudge):
    """The rule judge with counters, as the LLM judge has: judge_metrics all-reduces them."""

    def __init__(self) -> None:
        super().__init__()
        self.completions = 0

    def judge(self, items, completions):
        self.completions += len(completions)
        return super().judge(items, completions)

    def metrics(self) -> dict[str, float]:
        return {"judge/completions": float(self.completions), "judge/requests": 0.0}


def _rank(rank: int, world: int, port: int, data: str, policy) -> None:
    """One rank: joins the group init() asks for on a (pretended) CUDA machine, then runs the trainer's collectives
    on CPU with each tensor checked against that backend."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    asked: list[str] = []
    real_init = dist.init_process_group

    def init_gloo(backend=None, **kwargs):
        asked.append(backend)
        real_init("gloo", **kwargs)

    with (
        mock.patch.object(torch.cuda, "is_available", return_value=True),
        mock.patch.object(torch.cuda, "set_device"),
        mock.patch.object(dist, "init_process_group", init_gloo),
    ):
        env = distributed.init()
    assert env.device.type == "cuda" and asked, asked
    served, calls = served_devices(asked[0]), []

    def checked(name, collective):
        def call(*args, **kwargs):
            for arg in args:
                for t in arg if isinstance(arg, list) else [arg]:
                    if isinstance(t, torch.Tensor):
                        assert t.device.type in served, (
                            f"dist.{name} got a {t.device.type} tensor {tuple(t.shape)}: a {asked[0]!r} group has "
                            f"no backend for {t.device.type}"
                        )
            calls.append(name)
            return collective(*args, **kwargs)

        return call

    for name in TENSOR_COLLECTIVES:
        setattr(dist, name, checked(name, getattr(dist, name)))
    env = DistEnv(env.rank, env.world, torch.device("cpu"))  # the policy runs where it can: this CPU
    # with the options whose statistics span the ranks: the top-entropy mask and the adaptive entropy bonus
    cfg = build_config(
        {"batch_size": 4, "num_generations": 2, "max_completion_length": 4, "beta": 0.0}
        | {"top_entropy_quantile": 0.5, "use_adaptive_entropy": True}
    )
    items = load_seed(os.path.join(data, "train.jsonl"))
    judge = CountingJudge()
    trainer = GRPOTrainer(cfg, policy, items, env, judge=judge)
    trainer.train_step()
    evaluate(policy, load_seed(os.path.join(data, "val.jsonl"))[:3], judge, env, batch_size=4, max_new_tokens=4)
    assert judge_metrics(judge, env)["judge/completions"] == 2 * 4 + 3  # both ranks' step, the 3 eval items
    distributed.barrier(env)
    # the step's rewards, loss-normaliser counts, metric sums and gradients all went through the group
    assert calls.count("all_gather") >= 4 and calls.count("all_reduce") >= 4, calls
    distributed.shutdown()


def test_the_trainer_collectives_fit_the_backend_of_a_cuda_group(synthetic_data, tiny_policy):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # forked: the ranks start with this process's imports and a copy of the tiny policy (seconds, not ~20 s); they
    # never touch CUDA, which a forked child of a process that has used it could not
    mp.start_processes(_rank, args=(2, port, str(synthetic_data), tiny_policy), nprocs=2, start_method="fork")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: nccl")
def test_cpu_and_cuda_tensors_reduce_in_one_cuda_group(tmp_path):
    """On a GPU for real (a world of one): the group init() builds reduces CPU and CUDA tensors alike, where an
    nccl-only group refuses the CPU one."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(process_group_backend("cuda"), store=store, rank=0, world_size=1)
    try:
        for device in ("cpu", "cuda"):
            x = torch.ones(3, device=device)
            dist.all_reduce(x)
            assert x.device.type == device and x.tolist() == [1.0, 1.0, 1.0]
        out = [None]
        dist.all_gather_object(out, {"rank": 0})
        assert out == [{"rank": 0}]
        nccl_only = dist.new_group(backend="nccl")
        with pytest.raises(RuntimeError, match="cpu"):
            dist.all_reduce(torch.ones(3), group=nccl_only)
    finally:
        dist.destroy_process_group()
