"""fused_linear_grpo_loss, forward + backward, side by side with the other ways to get the same loss and gradients.

Rows (same inputs, same loss: DAPO, beta 0.04 with reference log-probs, on-policy):
- `floor-3-gemms`: the three GEMMs any implementation must run (logits, d hidden, d weight) and nothing else;
- `plain-chunk-loop`: the loop a user would write alone (`plain_chunk_loop`, ~30 lines, torch's default threads):
  per chunk of grpo_fast's size, the logits, log_softmax, the loss and `d logits` by hand, then the two GEMMs;
  checked against the reference (loss and both gradients) before it is timed;
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
(d weight [V, D] + d hidden [N, D], fp32); faster than every peer, the plain chunked loop included. The slow peers
(TRL, Liger: ~2x the floor) time 1 round there, the others 3.

`test_row_threads` times grpo_fast on one 256-row chunk of the same vocabulary with its row ops (softmax, log-probs,
`d logits`) on 1 thread and on all of torch's (the default, `rowwise_torch.set_row_threads`), "idle" (nothing
started) and "busy" (beside one CPU-spinning process), so the output shows what each choice costs in both cases;
`time_over_row_threads_1` is each row's time over the 1-thread row of the same load.

    pytest benchmarks/test_loss.py --benchmark-only --benchmark-columns=min,median,max,rounds
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from memory import peak_extra_bytes, synchronize

from grpo_fast.kernels import default_chunk_rows, fused_linear_grpo_loss, reference
from grpo_fast.kernels.rowwise_torch import get_row_threads, row_threads_now, set_row_threads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BETA = 0.04
# name: (B, T, D, V); "qwen2-vocab" is InternVL3-1B's language model (Qwen2-0.5B: D 896, V 151,936)
CPU_SHAPES = {"small": (8, 64, 256, 32_000), "qwen2-vocab": (16, 128, 896, 151_936)}
# N = B * T completion tokens of sequences of 1,024; D of 1.5B-class and 7B-class models, Qwen2's vocabulary
GPU_SHAPES = {f"n{b}k-d{d}": (b, 1024, d, 151_936) for b in (8, 32) for d in (2048, 4096)}
SHAPES = GPU_SHAPES if DEVICE.type == "cuda" else CPU_SHAPES
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32} if DEVICE.type == "cuda" else {"fp32": torch.float32}
IMPLS = ["floor-3-gemms", "plain-chunk-loop", "full-logits", "trl-chunked-head", "liger", "grpo_fast",
         "grpo_fast-cispo"]
PEERS = ("plain-chunk-loop", "full-logits", "trl-chunked-head", "liger")
# ~2x the floor on CPU: at qwen2-vocab one round after the warm-up tells them apart, and keeps the file's run ~6 min
SLOW_PEERS = ("trl-chunked-head", "liger")
# test_row_threads: one 256-row chunk (grpo_fast's chunk at this D, V; the qwen2-vocab rows run 8 of them)
LOAD_SHAPES = {"qwen2-vocab-n256": (2, 128, 896, 151_936)}
# row-op threads: one, or torch's count (the default)
ROW_THREADS = {"1": 1, "all": None}
TRL_VOCAB_CHUNK = 32_768  # the vocabulary tile TRL's GRPOTrainer passes (trl.trainer.utils)
_results: dict[tuple[str, str, str], tuple[float, int]] = {}  # (shape, dtype, impl) -> (median s, peak bytes)
_load_results: dict[tuple[str, str], float] = {}  # (load, row threads) -> median s


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


def plain_chunk_loop(hidden: torch.Tensor, weight: torch.Tensor, x: dict[str, torch.Tensor],
                     chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loop a user would write alone, in one pass with torch's default threads: per chunk of rows, the logits,
    log_softmax, the target log-probs, the chunk's share of the loss and `d logits = g (onehot - p)`, then
    `d hidden` and `d weight`. The rows' loss (DAPO, beta, on-policy, bias-corrected KL) by hand: the ratio
    r = exp(logp - sg[logp]) is 1 with d r / d logp = 1, so per valid token, with n the valid-token count,
    loss_t = (-A + beta (e^d - d - 1)) / n and g_t = d loss / d logp_t = (-A + beta (logp - ref)) / n, d = ref - logp
    (d/dlogp of (e^d - d - 1) r is (1 - e^d) + (e^d - d - 1)). -> loss, `d hidden [B, T, D]`, `d weight [V, D]`."""
    b, t, d = hidden.shape
    h, w = hidden.detach().reshape(-1, d), weight.detach()
    targets, ref = x["targets"].reshape(-1, 1), x["ref_logp"].reshape(-1)
    valid = x["mask"].reshape(-1).float()
    adv = x["advantages"].repeat_interleave(t)
    n = valid.sum().clamp(min=1.0)
    loss = h.new_zeros((), dtype=torch.float32)
    d_hidden, d_weight = torch.empty_like(h), torch.zeros_like(w)
    for s in range(0, h.shape[0], chunk):
        e = min(s + chunk, h.shape[0])
        logp_all = (h[s:e] @ w.t()).log_softmax(-1)
        logp = logp_all.gather(1, targets[s:e]).squeeze(1)
        diff = ref[s:e] - logp
        loss += (valid[s:e] * (-adv[s:e] + BETA * (diff.exp() - diff - 1))).sum() / n
        g = (valid[s:e] * (-adv[s:e] - BETA * diff) / n).unsqueeze(1).to(logp_all.dtype)
        d_logits = logp_all.exp_().mul_(-g).scatter_add_(1, targets[s:e], g)
        torch.mm(d_logits, w, out=d_hidden[s:e])
        d_weight.addmm_(d_logits.t(), h[s:e])
    return loss, d_hidden.view(b, t, d), d_weight


def check_plain_chunk_loop() -> None:
    """`plain_chunk_loop` against the reference's loss and autograd gradients (fp32), on a small case with masked
    tokens and a last chunk shorter than the others."""
    x = make_inputs(3, 5, 16, 300, device=torch.device("cpu"))
    x["mask"][0, 3:] = False
    hidden, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    logp = reference.fused_linear_logprobs(hidden, weight, x["targets"])
    ref_loss = reference.grpo_loss(logp, None, x["ref_logp"], x["advantages"], x["mask"], beta=BETA)[0]
    ref_loss.backward()
    loss, d_hidden, d_weight = plain_chunk_loop(hidden, weight, x, chunk=4)
    for got, want in ((loss, ref_loss), (d_hidden, hidden.grad), (d_weight, weight.grad)):
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)


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
    elif impl == "plain-chunk-loop":
        chunk = default_chunk_rows(weight.shape[0], d)  # grpo_fast's chunk: the same GEMM shapes

        def run():
            hidden.grad, weight.grad = plain_chunk_loop(hidden, weight, x, chunk)[1:]
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
    if impl == "plain-chunk-loop":
        check_plain_chunk_loop()
    x = make_inputs(b, t, d, v, DTYPES[dtype])
    step = make_step(impl, x)
    peak = peak_extra_bytes(step, DEVICE)  # also the warm-up (Liger compiles its chunk function here)
    rounds = 3 if shape == "qwen2-vocab" or DEVICE.type == "cuda" else 5
    if shape == "qwen2-vocab" and impl in SLOW_PEERS:
        rounds = 1
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
    if impl.startswith("grpo_fast") and DEVICE.type == "cpu":
        benchmark.extra_info.update(row_threads=row_threads_now())
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
        slower = {p: round(peer_time, 2) for p, (peer_time, _) in peers.items() if peer_time <= median}
        assert not slower, f"{median:.2f} s is not faster than every peer (plain-chunk-loop included): {slower}"


@pytest.fixture
def load(request) -> Iterator[str]:
    """"idle": nothing started; "busy": one CPU-spinning Python process beside the benchmark while the row runs."""
    if request.param == "idle":
        yield "idle"
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield "busy"
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the row-op threads are the CPU path's setting")
@pytest.mark.parametrize("row_threads", ROW_THREADS)
@pytest.mark.parametrize("load", ["idle", "busy"], indirect=True)
@pytest.mark.parametrize("shape", list(LOAD_SHAPES))
def test_row_threads(benchmark, shape: str, load: str, row_threads: str) -> None:
    b, t, d, v = LOAD_SHAPES[shape]
    step = make_step("grpo_fast", make_inputs(b, t, d, v))
    previous = get_row_threads()
    set_row_threads(ROW_THREADS[row_threads])
    try:
        benchmark.group = f"grpo_fast row-op threads, fwd+bwd {shape} fp32 N={b * t} D={d} V={v} cpu"
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
        chosen = row_threads_now()
    finally:
        set_row_threads(previous)
    median = statistics.median(benchmark.stats.stats.data)
    _load_results[(load, row_threads)] = median
    benchmark.extra_info.update(load=load, row_threads=chosen, torch_threads=torch.get_num_threads())
    if row_threads != "1" and (load, "1") in _load_results:
        benchmark.extra_info["time_over_row_threads_1"] = round(median / _load_results[(load, "1")], 3)
