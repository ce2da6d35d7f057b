"""fused_linear_logprobs and fused_linear_grpo_loss on each backend against the full-logits reference:
values, metrics and the gradients of hidden, weight and bias."""

import itertools

import pytest
import torch

from grpo_fast.kernels import default_chunk_rows, fused_linear_grpo_loss, fused_linear_logprobs, use_backend
from tests.kernels.utils import BACKENDS, DTYPES, assert_close_to_ref, generator


def _inputs(b, t, d, v, dtype, bias=True, seed=0):
    g = generator(seed)
    hidden = torch.randn(b, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5 * 3
    return {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "bias": (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None,
        "targets": torch.randint(0, v, (b, t), generator=g),
    }


def _as_fp64(tensors):
    return {k: (x.double() if x is not None and k != "targets" else x) for k, x in tensors.items()}


def _grads(backend, fn, tensors, **kwargs):
    """Run fn on fresh leaf copies under `backend`; return its outputs and the grads of hidden, weight, bias."""
    leaves = {k: (x.detach().clone().requires_grad_() if k != "targets" and x is not None else x)
              for k, x in tensors.items()}
    with use_backend(backend):
        out = fn(**leaves, **kwargs)
    return out, [leaves[k].grad for k in ("hidden", "weight", "bias") if leaves[k] is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("b, t, d, v, chunk", [(3, 47, 31, 123, 16), (2, 3, 8, 151_936, 4), (1, 1, 16, 1003, None)])
@pytest.mark.parametrize("temperature, return_entropy", [(1.0, False), (0.7, True)])
def test_logprobs_match_reference(device, backend, dtype, atol, b, t, d, v, chunk, temperature,
                                  return_entropy):
    tensors = _inputs(b, t, d, v, dtype)
    g = generator(1)
    grad_logp, grad_ent = torch.randn(b, t, generator=g, dtype=torch.float64), torch.randn(b, t, generator=g)

    def run(backend, tensors):
        def fn(**kw):
            out = fused_linear_logprobs(**kw, temperature=temperature, chunk_size=chunk, return_entropy=return_entropy)
            logp, ent = out if return_entropy else (out, None)
            loss = (logp * grad_logp.to(logp.dtype)).sum()
            if ent is not None:
                loss = loss + (ent * grad_ent.to(ent.dtype)).sum()
            loss.backward()
            return [logp] + ([ent] if ent is not None else [])
        return _grads(backend, fn, tensors)

    outs, grads = run(backend, tensors)
    ref_outs, ref_grads = run("reference", tensors)
    ref64_outs, ref64_grads = run("reference", _as_fp64(tensors))
    for name, o, r, r64 in zip(("logp", "entropy", "d hidden", "d weight", "d bias"),
                               outs + grads, ref_outs + ref_grads, ref64_outs + ref64_grads):
        assert o.dtype == r.dtype, name
        assert_close_to_ref(o, r, r64, atol, name)


LOSS_CASES = list(itertools.product(("grpo", "bnpo", "dapo", "dr_grpo"), ("token", "sequence"), (0.0, 0.04),
                                    (False, True)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, level, beta, with_old", LOSS_CASES)
def test_grpo_loss_matches_reference(device, backend, loss_type, level, beta, with_old):
    b, t, d, v = 4, 9, 12, 257
    tensors = _inputs(b, t, d, v, torch.float32)
    g = generator(2)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[1] = False  # an all-masked sequence
    mask[2, :4] = True
    with torch.no_grad():
        base = fused_linear_logprobs(tensors["hidden"], tensors["weight"], tensors["targets"], tensors["bias"])
    kwargs = {
        "mask": mask,
        "advantages": torch.randn(b, generator=g),
        "ref_logp": base + 0.3 * torch.randn(b, t, generator=g),
        # old log-probs near the current ones, so that some ratios land outside [0.8, 1.28] and some inside
        "old_logp": base + 0.25 * torch.randn(b, t, generator=g) if with_old else None,
        "beta": beta, "epsilon_high": 0.28, "loss_type": loss_type, "importance_sampling_level": level,
        "temperature": 0.9, "max_completion_length": 12, "chunk_size": 7,
    }

    def fn(**kw):
        loss, metrics = fused_linear_grpo_loss(**kw, **kwargs)
        loss.backward()
        return loss, metrics

    (loss, metrics), grads = _grads(backend, fn, tensors)
    (ref_loss, ref_metrics), ref_grads = _grads("reference", fn, tensors)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert metrics.keys() == ref_metrics.keys() and "entropy" in metrics and "kl" in metrics
    for key in metrics:
        torch.testing.assert_close(metrics[key], ref_metrics[key], atol=1e-6, rtol=1e-5, msg=key)
    for name, gr, ref in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        torch.testing.assert_close(gr, ref, atol=1e-6, rtol=1e-5, msg=name)
    if with_old:  # the case must exercise clipping for the comparison to mean anything
        assert metrics["clip_ratio/region_mean"] > 0 or level == "sequence"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_bf16_within_torch_error(device, backend):
    tensors = _inputs(2, 5, 16, 1003, torch.bfloat16, bias=False)
    mask = torch.ones(2, 5, dtype=torch.bool)
    kwargs = {"old_logp": None, "ref_logp": None, "advantages": torch.tensor([1.0, -0.5]), "mask": mask,
              "chunk_size": 3}

    def fn(**kw):
        loss, _ = fused_linear_grpo_loss(**kw, **kwargs)
        loss.backward()
        return loss

    out, grads = _grads(backend, fn, tensors)
    ref, ref_grads = _grads("reference", fn, tensors)
    ref64, ref64_grads = _grads("reference", fn, _as_fp64(tensors))
    for name, o, r, r64 in zip(("loss", "d hidden", "d weight"), [out] + grads, [ref] + ref_grads,
                               [ref64] + ref64_grads):
        assert o.dtype == r.dtype, name
        assert_close_to_ref(o, r, r64, 1e-3, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_lm_head_gets_no_gradient(device, backend):
    # LoRA training keeps lm_head frozen: only d hidden is computed
    tensors = _inputs(2, 3, 8, 50, torch.float32, bias=False)
    hidden = tensors["hidden"].clone().requires_grad_()
    with use_backend(backend):
        loss, _ = fused_linear_grpo_loss(hidden, tensors["weight"], tensors["targets"], None, None,
                                         torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert tensors["weight"].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_scaled_by_incoming_gradient(device, backend):
    tensors = _inputs(2, 3, 8, 50, torch.float32, bias=False)
    grads = []
    for scale in (1.0, 0.25):
        weight = tensors["weight"].clone().requires_grad_()
        with use_backend(backend):
            loss, _ = fused_linear_grpo_loss(tensors["hidden"], weight, tensors["targets"], None, None,
                                             torch.tensor([1.0, -1.0]), torch.ones(2, 3))
        (loss * scale).backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[1], grads[0] * 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocab_entries(device, backend):
    # a -inf bias bans tokens (as a vocabulary mask would): log-probs, entropy and gradients stay finite
    tensors = _inputs(2, 3, 8, 50, torch.float32)
    tensors["bias"][::3] = -float("inf")
    tensors["targets"] = tensors["targets"] // 3 * 3 + 1  # never a banned id

    def fn(**kw):
        logp, entropy = fused_linear_logprobs(**kw, return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
        return logp, entropy

    (logp, entropy), grads = _grads(backend, fn, tensors)
    # the reference over the allowed vocabulary only: a banned token must behave as if it did not exist
    keep = torch.isfinite(tensors["bias"])
    reduced = {"hidden": tensors["hidden"], "weight": tensors["weight"][keep], "bias": tensors["bias"][keep],
               "targets": (keep.cumsum(0) - 1)[tensors["targets"]]}
    (ref_logp, ref_entropy), (ref_dh, ref_dw, ref_db) = _grads("reference", fn, reduced)
    d_hidden, d_weight, d_bias = grads
    for out, ref in zip([logp, entropy, d_hidden, d_weight[keep], d_bias[keep]],
                        [ref_logp, ref_entropy, ref_dh, ref_dw, ref_db]):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(d_weight[~keep], torch.zeros_like(d_weight[~keep]))


def test_default_chunk_rows():
    # D / 4 rounded up to a multiple of 128: the chunk's logits cost ~a quarter of the weight gradient
    assert default_chunk_rows(151_936, 896) == 256
    assert default_chunk_rows(151_936, 4096) == 1024
    assert default_chunk_rows(151_936, 1536) == 384
    # a small vocab gets at least 64 MiB of logits per chunk: 64 MiB / (1003 * 4 B) = 16,726 rows -> 16,640
    assert default_chunk_rows(1003, 31) == 16_640
