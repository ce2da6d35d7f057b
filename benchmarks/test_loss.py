"""fused_linear_grpo_loss, forward + backward, side by side with the other ways to get the same loss and gradients.

Rows (same inputs, same loss: DAPO, beta 0.04 with reference log-probs, on-policy):
- `floor-3-gemms`: the three GEMMs any implementation must run (logits, d hidden, d weight) and nothing else;
- `full-logits`: `grpo_fast.kernels.reference`, i.e. the `[N, V]` logits, log_softmax gather, the loss, autograd;
- `trl-chunked-head`: TRL's fused lm_head (`ChunkedLogProbFunction`, what its GRPOTrainer runs) + the same loss;
- `liger`: Liger-Kernel's `LigerFusedLinearGRPOLoss` (defaults: torch.compile'd chunks of one sequence);
- `grpo_fast`: this project (chunked torch path on CPU, Triton on CUDA);
- `grpo_fast-cispo`: the same with `loss_type="cispo"` (epsilon_high 5.0, ScaleRL's value), a loss variant's cost:
  at most 1.05x the `grpo_fast` (dapo) row, asserted where the CPU targets are.
Each row records its median time and its peak extra memory (`extra_info`): on CPU the resident-set high-water mark
above what was resident before the call, on CUDA the allocator's peak (`max_memory_allocated` after
`reset_peak_memory_stats`). On CUDA every step ends with `torch.cuda.synchronize()`, so the timer sees the work,
not its launch.

Shapes: on CPU `small` and `qwen2-vocab` in fp32; on CUDA the GPU shapes (N = 8,192 and 32,768 tokens, D = 2,048
and 4,096, V = 151,936), in bf16 and fp32. `scripts/gpu_check.py` runs the same rows and checks the GPU targets.

Targets at N = 2,048 tokens, D = 896, V = 151,936, fp32, on CPU (asserted in the `grpo_fast` row, which runs last):
time <= 1.15x the three-GEMM floor; peak extra memory <= 1.3x the gradient buffers the backward must return anyway
(d weight [V, D] + d hidden [N, D], fp32). The speedup over each peer is recorded, not asserted: Liger 0.8.5
(torch.compile'd chunks) runs within ~1.2x of the floor here, so no implementation that performs the three GEMMs
can be much faster than it.

    pytest benchmarks/test_loss.py --benchmark-only --benchmark-columns=min,median,max,rounds
"""

from __future__ import annotations

import statistics

import pytest
import torch
from memory import peak_extra_bytes, synchronize

from grpo_fast.kernels import fused_linear_grpo_loss, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BETA = 0.04
# name: (B, T, D, V); "qwen2-vocab" is InternVL3-1B's language model (Qwen2-0.5B: D 896, V 151,936)
CPU_SHAPES = {"small": (8, 64, 256, 32_000), "qwen2-vocab": (16, 128, 896, 151_936)}
# N = B * T completion tokens of sequences of 1,024; D of 1.5B-class and 7B-class models, Qwen2's vocabulary
GPU_SHAPES = {f"n{b}k-d{d}": (b, 1024, d, 151_936) for b in (8, 32) for d in (2048, 4096)}
SHAPES = GPU_SHAPES if DEVICE.type == "cuda" else CPU_SHAPES
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32} if DEVICE.type == "cuda" else {"fp32": torch.float32}
IMPLS = ["floor-3-gemms", "full-logits", "trl-chunked-head", "liger", "grpo_fast", "grpo_fast-cispo"]
PEERS = ("full-logits", "trl-chunked-head", "liger")
TRL_VOCAB_CHUNK = 32_768  # the vocabulary tile TRL's GRPOTrainer passes (trl.trainer.utils)
_results: dict[tuple[str, str, str], tuple[float, int]] = {}  # (shape, dtype, impl) -> (median s, peak bytes)


def make_inputs(b: int, t: int, d: int, v: int, dtype: torch.dtype = torch.float32,
                device: torch.device = DEVICE) -> dict[str, torch.Tensor]:
    """The rows' shared inputs, drawn on `device`: `hidden [B, T, D]` and `weight [V, D]` in `dtype`, targets, an
    all-valid mask, advantages and reference log-probs near the policy's."""
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(b, t, d, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, d, generator=g, device=device) / d**0.5).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g, device=device)
    with torch.no_grad():
        ref = reference.fused_linear_logprobs(hidden[:1], weight, targets[:1]).expand(b, t) - 0.1
    return {
        "hidden": hidden, "weight": weight, "targets": targets, "mask": torch.ones(b, t, dtype=torch.bool, device=device),
        "advantages": torch.randn(b, generator=g, device=device), "ref_logp": ref.contiguous(),
    }


def make_step(impl: str, x: dict[str, torch.Tensor]):
    """A no-argument callable: one forward + backward of `impl` from fresh leaves (grads of hidden and weight),
    which returns once the device has finished it."""
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    b, t, d = hidden.shape

    def loss_from_logp(logp: torch.Tensor) -> torch.Tensor:
        return reference.grpo_loss(logp.view(b, t), None, x["ref_logp"], x["advantages"], x["mask"], beta=BETA)[0]

    if impl == "floor-3-gemms":
        h2 = hidden.detach().view(-1, d)

        def run():
            logits = h2 @ weight.detach().t()
            d_hidden = logits @ weight.detach()
            d_weight = logits.t() @ h2
            return d_hidden, d_weight
    elif impl == "full-logits":

        def run():
            logp = reference.fused_linear_logprobs(hidden, weight, x["targets"])
            loss_from_logp(logp).backward()
    elif impl == "trl-chunked-head":
        chunked = pytest.importorskip("trl.kernels.chunked_logprob").ChunkedLogProbFunction

        def run():
            logp = chunked.apply(hidden.view(-1, d), weight, None, x["targets"].view(-1), 1.0, TRL_VOCAB_CHUNK,
                                 None, 1.0, ())[0]
            loss_from_logp(logp).backward()
    elif impl == "liger":
        liger = pytest.importorskip("liger_kernel.chunked_loss").LigerFusedLinearGRPOLoss(beta=BETA)
        torch._dynamo.reset()  # Liger torch.compiles its chunk function; a stale graph from another shape breaks it

        def run():
            loss, _ = liger(hidden, weight, x["targets"], x["mask"], x["advantages"], ref_per_token_logps=x["ref_logp"])
            loss.backward()
    else:
        variant = {"loss_type": "cispo", "epsilon_high": 5.0} if impl == "grpo_fast-cispo" else {}

        def run():
            loss, _ = fused_linear_grpo_loss(hidden, weight, x["targets"], None, x["ref_logp"], x["advantages"],
                                             x["mask"], beta=BETA, **variant)
            loss.backward()

    def step():
        hidden.grad = weight.grad = None
        run()
        synchronize(hidden.device)
        hidden.grad = weight.grad = None  # freed inside the call, so every round starts from the same memory

    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_linear_grpo_loss(benchmark, shape: str, dtype: str, impl: str) -> None:
    b, t, d, v = SHAPES[shape]
    x = make_inputs(b, t, d, v, DTYPES[dtype])
    step = make_step(impl, x)
    peak = peak_extra_bytes(step, DEVICE)  # also the warm-up (Liger compiles its chunk function here)
    rounds = 3 if shape == "qwen2-vocab" or DEVICE.type == "cuda" else 5
    benchmark.group = f"fused_linear_grpo_loss fwd+bwd {shape} {dtype} N={b * t} D={d} V={v} {DEVICE.type}"
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    median = statistics.median(benchmark.stats.stats.data)
    _results[(shape, dtype, impl)] = (median, peak)
    n = b * t
    grad_bytes = (v * d + n * d) * DTYPES[dtype].itemsize
    tokens_per_s = n / median
    benchmark.extra_info.update(
        peak_extra_MB=round(peak / 2**20, 1), peak_over_grad_buffers=round(peak / grad_bytes, 3),
        tokens_per_s=round(tokens_per_s, 1),
    )
    if impl == "grpo_fast-cispo" and (shape, dtype, "grpo_fast") in _results:
        dapo = _results[(shape, dtype, "grpo_fast")][0]
        benchmark.extra_info["time_over_dapo"] = round(median / dapo, 3)
        if shape == "qwen2-vocab" and DEVICE.type == "cpu":
            assert median <= 1.05 * dapo, f"cispo {median:.2f} s is over 1.05x dapo ({dapo:.2f} s)"
    if impl != "grpo_fast":
        return
    floor = _results.get((shape, dtype, "floor-3-gemms"))
    peers = {p: _results[(shape, dtype, p)] for p in PEERS if (shape, dtype, p) in _results}
    if floor:
        benchmark.extra_info["time_over_floor"] = round(median / floor[0], 3)
    for peer, (peer_time, peer_peak) in peers.items():
        benchmark.extra_info[f"speedup_over_{peer}"] = round(peer_time / median, 3)
        benchmark.extra_info[f"memory_saving_over_{peer}"] = round(peer_peak / peak, 3)
    if shape == "qwen2-vocab" and DEVICE.type == "cpu" and floor:
        assert median <= 1.15 * floor[0], f"{median:.2f} s is over 1.15x the GEMM floor ({floor[0]:.2f} s)"
        assert peak <= 1.3 * grad_bytes, f"peak extra {peak / 2**30:.2f} GiB > 1.3x grad buffers"
