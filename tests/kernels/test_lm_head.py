"""The fused paths' GEMMs (grpo_fast.kernels.lm_head): their dtype, how many run, the fp32 accumulation of
`d weight` on every torch, and the one backward the fused loss supports."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fast.kernels import fused_linear_grpo_loss, fused_linear_logprobs, lm_head, use_backend
from tests.kernels.utils import BACKENDS, assert_close_to_ref, generator

aten = torch.ops.aten
GEMMS = (aten.mm, aten.addmm, aten.addmm_)


class GemmLog(TorchDispatchMode):
    """Records the operand dtypes of every GEMM (mm / addmm) run inside it."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in GEMMS:
            a, b = args[-2:] if func.overloadpacket is aten.mm else args[1:3]
            self.dtypes.append((a.dtype, b.dtype))
        return func(*args, **(kwargs or {}))


def _inputs(b, t, d, v, dtype, seed=0):
    g = generator(seed)
    hidden = torch.randn(b, t, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 3).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    adv = torch.randn(b, generator=g)
    return hidden, weight, targets, adv


def _loss_and_grads(backend, hidden, weight, targets, adv, **kwargs):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with use_backend(backend):
        loss, _ = fused_linear_grpo_loss(hidden, weight, targets, None, None, adv, torch.ones(targets.shape), **kwargs)
    loss.backward()
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("on_policy", [True, False])
def test_three_gemms_per_chunk(device, backend, level, on_policy):
    # logits, d hidden, d weight per chunk; off-policy sequence-level weights need each sequence's log-probs first
    # (one more logits GEMM per chunk, no grad), on-policy they are 1 and no extra GEMM may run
    hidden, weight, targets, adv = _inputs(2, 5, 8, 50, torch.float32)
    old = None if on_policy else -torch.rand(2, 5)
    hidden.requires_grad_(), weight.requires_grad_()
    with GemmLog() as log, use_backend(backend):
        loss, _ = fused_linear_grpo_loss(hidden, weight, targets, old, None, adv, torch.ones(2, 5), chunk_size=4,
                                         importance_sampling_level=level)
        loss.backward()
    chunks = 3  # 10 rows in chunks of 4
    extra = chunks if level == "sequence" and not on_policy else 0
    assert len(log.dtypes) == 3 * chunks + extra


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gemms_on_an_fp32_master_weight(device, backend):
    # compute_dtype=bf16 on fp32 hidden and weight: every GEMM reads bf16 operands, or their exact fp32 copies
    # (the d weight accumulation where addmm has no fp32 output); gradients come back fp32, d weight summed in fp32
    hidden, weight, targets, adv = _inputs(3, 7, 16, 301, torch.float32)
    lm_head.fp32_out_addmm(device.type)  # its one-time 2 x 2 trial GEMM, before the log starts
    with GemmLog() as log:
        loss, d_hidden, d_weight = _loss_and_grads(backend, hidden, weight, targets, adv, chunk_size=5,
                                                   compute_dtype=torch.bfloat16)
    bf16, fp32 = (log.dtypes.count((dtype, dtype)) for dtype in (torch.bfloat16, torch.float32))
    # 21 rows in 5 chunks: 5 logits and 5 d hidden GEMMs in bf16, the 5 d weight ones in bf16 or upcast
    assert bf16 >= 10 and fp32 <= 5 and bf16 + fp32 == len(log.dtypes) == 15, log.dtypes
    assert d_hidden.dtype == d_weight.dtype == torch.float32
    # not rounded to bf16 at the end: most entries carry more than bf16's 8 significant bits
    assert (d_weight != d_weight.bfloat16().float()).float().mean() > 0.5
    ref = _loss_and_grads("reference", hidden, weight, targets, adv, compute_dtype=torch.bfloat16)
    ref64 = _loss_and_grads("reference", hidden.double(), weight.double(), targets, adv)
    for name, out, r, r64 in zip(("loss", "d hidden", "d weight"), (loss, d_hidden, d_weight), ref, ref64):
        assert_close_to_ref(out, r, r64, 1e-3, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_compute_dtype_is_the_narrower(device, backend):
    # a bf16 hidden (the model under autocast) against an fp32 master weight: bf16 GEMMs by default, fp32 ones with
    # compute_dtype=torch.float32 (cast_lm_head_to_fp32); each gradient in its input's dtype
    hidden, weight, targets, _ = _inputs(2, 3, 8, 40, torch.float32)
    hidden = hidden.bfloat16().requires_grad_()
    weight.requires_grad_()
    for compute_dtype, gemm_dtype in ((None, torch.bfloat16), (torch.float32, torch.float32)):
        with GemmLog() as log, use_backend(backend):
            logp = fused_linear_logprobs(hidden, weight, targets, compute_dtype=compute_dtype)
        assert log.dtypes == [(gemm_dtype, gemm_dtype)]
        logp.sum().backward()
        assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
        hidden.grad = weight.grad = None
    with pytest.raises(ValueError, match="compute_dtype must be a floating-point dtype"), use_backend(backend):
        fused_linear_logprobs(hidden, weight, targets, compute_dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_backward_is_a_clear_error(device, backend):
    hidden, weight, targets, adv = _inputs(2, 3, 8, 40, torch.float32)
    weight.requires_grad_()
    with use_backend(backend):
        loss, _ = fused_linear_grpo_loss(hidden, weight, targets, None, None, adv, torch.ones(2, 3))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward .* is not supported"):
        loss.backward()


@pytest.fixture
def probe():
    """`lm_head.fp32_out_addmm`, forgotten before and after the test (it is cached per device type)."""
    lm_head.fp32_out_addmm.cache_clear()
    yield lm_head.fp32_out_addmm
    lm_head.fp32_out_addmm.cache_clear()


def _emulated_addmm(real):
    """torch.addmm as a torch with a working fp32 `out_dtype` overload behaves (emulated by upcasting)."""

    def addmm(acc, a, b, *, beta=1.0, alpha=1.0, out_dtype=None, out=None):
        if out_dtype is None:
            return real(acc, a, b, beta=beta, alpha=alpha, out=out)
        return real(acc.to(out_dtype), a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha, out=out)

    return addmm


def _old_torch(error):
    """torch.addmm as an older torch behaves: `error` as soon as `out_dtype` is passed."""
    real = torch.addmm

    def addmm(*args, out_dtype=None, **kwargs):
        if out_dtype is not None:
            raise error
        return real(*args, **kwargs)

    return addmm


def _silently_wrong(*args, out=None, **kwargs):
    return out  # accepts the call, writes nothing


@pytest.mark.parametrize("world, supported", [
    ("this torch", None),  # whatever this build does, decided by trying it
    ("torch < 2.8: no out_dtype keyword", False),
    ("CUDA before pytorch#167931: fp32 self beside bf16 matrices rejected", False),
    ("an overload that returns garbage", False),
    ("a working fp32-output overload", True),
])
def test_bf16_weight_gradient_sums_in_fp32_on_every_torch(device, monkeypatch, probe, world, supported):
    fakes = {
        "torch < 2.8: no out_dtype keyword": _old_torch(TypeError("addmm() got an unexpected keyword 'out_dtype'")),
        "CUDA before pytorch#167931: fp32 self beside bf16 matrices rejected":
            _old_torch(RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")),
        "an overload that returns garbage": _silently_wrong,
        "a working fp32-output overload": _emulated_addmm(torch.addmm),
    }
    if world in fakes:
        monkeypatch.setattr(torch, "addmm", fakes[world])
    if supported is not None:
        assert probe(device.type) is supported
    g = generator(0)
    chunks = [(torch.randn(64, 3, generator=g).bfloat16(), torch.randn(3, 16, generator=g).bfloat16())
              for _ in range(40)]
    acc = torch.empty(64, 16)
    for i, (a, b) in enumerate(chunks):
        lm_head.accumulate_mm_(acc, a, b, first=i == 0)
    exact = sum(a.double() @ b.double() for a, b in chunks)
    # fp32 sums of exact bf16 products: ~1e-7 relative, where a bf16 rounding per chunk would cost ~4e-3
    torch.testing.assert_close(acc.double(), exact, atol=1e-5, rtol=1e-5)
