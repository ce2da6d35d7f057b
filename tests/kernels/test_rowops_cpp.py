"""The C++ row ops (`grpo_fast._tiling.row_stats` / `row_grad`, csrc/rowops*.cpp) behind `rowwise_torch`'s CPU path:
values against an fp64 reference on odd shapes, the same floats on every kernel path (scalar, AVX2, AVX-512) and
thread count, where `rowwise_torch` takes them and where it falls back to torch, and the bindings' argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grpo_fast import _tiling
from grpo_fast.kernels import rowwise_torch
from grpo_fast.vision.tiling import allow_simd, supported_isas
from tests.kernels.utils import assert_close_to_ref, generator

SIMD_ISAS = ["avx2", "avx512"]


def _logits(rows: int, vocab: int, seed: int, scale: float = 4.0, masked: bool = True) -> torch.Tensor:
    """fp32 `[rows, vocab]` noise; with `masked`, a -inf run in the first row's first half and scattered -inf."""
    g = generator(seed)
    z = torch.randn(rows, vocab, generator=g) * scale
    if masked and vocab > 2:
        z[0, : vocab // 2] = -float("inf")
        z[torch.rand(rows, vocab, generator=g) < 0.1] = -float("inf")
        z[:, -1] = torch.randn(rows, generator=g)  # the target column stays finite
    return z


def _stats(z: torch.Tensor, targets: torch.Tensor, temperature: float, threads: int = 1, extra: bool = False):
    """The extension's row_stats of `z` (fp32 or bf16) -> logp, lse, entropy (and row_max, log_sum with `extra`)."""
    rows = z.shape[0]
    outs = [torch.full((rows,), 7.0) for _ in range(5 if extra else 3)]
    _tiling.row_stats(rowwise_torch._np(z), targets.numpy(), 1.0 / temperature, *(o.numpy() for o in outs),
                      num_threads=threads)
    return outs


def _grad(z: torch.Tensor, targets: torch.Tensor, temperature: float, lse: torch.Tensor, g: torch.Tensor,
          g_h: torch.Tensor | None, entropy: torch.Tensor | None, out: torch.Tensor, threads: int = 1) -> torch.Tensor:
    _tiling.row_grad(rowwise_torch._np(z), targets.numpy(), 1.0 / temperature, lse.numpy(), g.numpy(),
                     grad_entropy=None if g_h is None else g_h.numpy(),
                     entropy=None if entropy is None else entropy.numpy(), out=rowwise_torch._np(out),
                     num_threads=threads)
    return out


def _reference(z: torch.Tensor, targets: torch.Tensor, temperature: float, g: torch.Tensor, g_h: torch.Tensor | None):
    """logp, lse, entropy and d logits by the plain formulas in z's dtype (fp32, or fp64 for the exact reference)."""
    zt = z / temperature
    logp_all = zt.log_softmax(-1)
    p = logp_all.exp()
    safe = torch.where(p > 0, logp_all, 0.0)
    entropy = -(p * safe).sum(-1)
    onehot = torch.nn.functional.one_hot(targets, z.shape[1]).to(z.dtype)
    d = g[:, None].to(z.dtype) * (onehot - p)
    if g_h is not None:
        d = d - g_h[:, None].to(z.dtype) * p * (safe + entropy[:, None])
    return logp_all.gather(1, targets[:, None])[:, 0], torch.logsumexp(zt, -1), entropy, d / temperature


def _vectors(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(seed)
    return torch.randn(rows, generator=g), torch.randn(rows, generator=g)


@pytest.mark.parametrize("rows, vocab", [(1, 1), (3, 5), (2, 16), (4, 17), (1, 100), (5, 1003), (2, 151_936)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_values_match_the_fp64_reference(rows, vocab, temperature, with_entropy_grad):
    z = _logits(rows, vocab, seed=vocab + rows)
    targets = torch.full((rows,), vocab - 1)
    g, g_h = _vectors(rows, 1)
    g_h = g_h if with_entropy_grad else None
    logp, lse, entropy = _stats(z, targets, temperature)
    d = _grad(z, targets, temperature, lse, g, g_h, entropy if g_h is not None else None, torch.empty_like(z))
    want32 = _reference(z, targets, temperature, g, g_h)
    want64 = _reference(z.double(), targets, temperature, g.double(), None if g_h is None else g_h.double())
    for name, got, w32, w64 in zip(("logp", "lse", "entropy", "d logits"), (logp, lse, entropy, d), want32, want64):
        assert torch.isfinite(got).all(), name
        assert_close_to_ref(got, w32, w64, 1e-6, name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_rows_match_the_fp64_reference(temperature):
    # bf16 logits are read exactly and the math is fp32: only the bf16 `d logits` is rounded (to nearest even)
    z = _logits(3, 1003, seed=5).bfloat16()
    targets = torch.tensor([1002, 7, 500])
    z[1:, targets[1:]] = 1.0
    g, g_h = _vectors(3, 2)
    logp, lse, entropy = _stats(z, targets, temperature)
    d = _grad(z, targets, temperature, lse, g, g_h, entropy, torch.empty_like(z))
    want32 = _reference(z.float(), targets, temperature, g, g_h)
    want64 = _reference(z.double(), targets, temperature, g.double(), g_h.double())
    for name, got, w32, w64 in zip(("logp", "lse", "entropy"), (logp, lse, entropy), want32, want64):
        assert_close_to_ref(got, w32, w64, 1e-6, name)
    assert d.dtype == torch.bfloat16
    assert torch.equal(d, _grad(z.float(), targets, temperature, lse, g, g_h, entropy, torch.empty_like(z.float()))
                       .bfloat16())
    assert_close_to_ref(d, want32[3].bfloat16(), want64[3], 1e-3, "d logits")


def test_a_fully_masked_row_is_nan_as_in_torch():
    z = _logits(3, 40, seed=3, masked=False)
    z[1] = -float("inf")
    targets = torch.tensor([0, 1, 2])
    logp, lse, entropy = _stats(z, targets, 1.0)
    assert torch.isnan(logp[1]) and torch.isnan(lse[1]) and torch.isnan(entropy[1])
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(entropy[[0, 2]]).all()
    d = _grad(z, targets, 1.0, lse, *_vectors(3, 4), entropy, torch.empty_like(z))
    assert torch.isnan(d[1]).all() and torch.isfinite(d[[0, 2]]).all()


def test_in_place_and_strided_rows_equal_out_of_place():
    wide = _logits(6, 300, seed=4)
    z = wide[:, 10:263]  # rows 300 apart, 253 wide
    targets = torch.tensor([250, 3, 100, 0, 252, 17])
    _, lse, entropy, row_max, log_sum = _stats(z, targets, 0.9, extra=True)
    assert torch.equal(row_max, z.amax(-1)) and torch.equal(lse, row_max * torch.tensor(1 / 0.9) + log_sum)
    g, g_h = _vectors(6, 5)
    out = _grad(z.contiguous(), targets, 0.9, lse, g, g_h, entropy, torch.empty(6, 253))
    in_place = wide.clone()
    _grad(in_place[:, 10:263], targets, 0.9, lse, g, g_h, entropy, in_place[:, 10:263])
    assert torch.equal(in_place[:, 10:263], out)
    assert torch.equal(in_place[:, :10], wide[:, :10]) and torch.equal(in_place[:, 263:], wide[:, 263:])


def _all_outputs(threads: int = 1) -> list[torch.Tensor]:
    """Every output of a mix of cases: fp32 and bf16, tails of every length mod 32, temperature, masked logits,
    logits spread so widely that exp underflows through the denormals, with and without the entropy terms."""
    outs = []
    for vocab, scale, temperature in ((151_936, 4.0, 1.0), (1003, 40.0, 0.7), (33, 4.0, 1.3), (7, 4.0, 1.0)):
        for dtype in (torch.float32, torch.bfloat16):
            z = _logits(7, vocab, seed=vocab, scale=scale).to(dtype)
            targets = torch.randint(0, vocab, (7,), generator=generator(vocab))
            logp, lse, entropy, row_max, log_sum = _stats(z, targets, temperature, threads, extra=True)
            g, g_h = _vectors(7, vocab)
            d = _grad(z, targets, temperature, lse, g, None, None, torch.empty_like(z), threads)
            d_h = z.clone()
            _tiling.row_grad(rowwise_torch._np(d_h), targets.numpy(), 1.0 / temperature, log_sum.numpy(), g.numpy(),
                             shift=row_max.numpy(), grad_entropy=g_h.numpy(), entropy=entropy.numpy(),
                             out=rowwise_torch._np(d_h), num_threads=threads)
            outs += [logp, lse, entropy, row_max, log_sum, d, d_h]
    return outs


def _assert_bitwise_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rowwise_torch._np(a).tobytes() == rowwise_torch._np(b).tobytes(), f"output {i}"


@pytest.mark.parametrize("simd", SIMD_ISAS)
def test_simd_paths_give_the_scalar_floats(simd):
    if simd not in supported_isas():
        pytest.skip(f"this CPU or OS has no {simd} (cpuid / xgetbv)")
    try:
        allow_simd("scalar")
        scalar = _all_outputs()
        allow_simd(simd)
        wide = _all_outputs()
    finally:
        allow_simd(True)
    _assert_bitwise_equal(wide, scalar)


def test_thread_count_does_not_change_a_bit():
    one = _all_outputs(threads=1)
    for threads in (2, 3):
        _assert_bitwise_equal(_all_outputs(threads), one)


def _spy_on_the_extension(monkeypatch, calls: list[str]) -> None:
    """Append the name and thread count of each `_tiling.row_stats` / `row_grad` call that rowwise_torch makes to
    `calls`."""
    def spy(name):
        fn = getattr(_tiling, name)

        def call(*args, **kwargs):
            calls.append(f"{name} on {kwargs['num_threads']}")
            return fn(*args, **kwargs)

        return call

    for name in ("row_stats", "row_grad"):
        monkeypatch.setattr(rowwise_torch._tiling, name, spy(name))


def test_rowwise_torch_runs_cpp_where_it_applies(monkeypatch):
    calls = []
    _spy_on_the_extension(monkeypatch, calls)
    z = _logits(5, 300, seed=6)
    targets = torch.randint(0, 300, (5,), generator=generator(6)).int()
    g, g_h = _vectors(5, 6)
    seen = []

    def dlogp_fn(start, end, logp, entropy):
        seen.append((start, end))
        return g[start:end].double()  # any float dtype

    row_threads = rowwise_torch.get_row_threads()
    rowwise_torch.set_row_threads(2)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            logits = z.to(dtype)
            cpp = [rowwise_torch.row_stats(logits, targets, 0.8, True)]
            cpp.append(rowwise_torch.row_grad(logits, targets, cpp[0][1], g, g_h, cpp[0][2], 0.8,
                                              torch.empty_like(logits)))
            d = logits.clone()
            cpp.append(rowwise_torch.logprobs_and_grad_(d, targets, 0.8, dlogp_fn, g_h) + (d,))
            assert calls == ["row_stats on 2", "row_grad on 2"] * 2 and seen == [(0, 5)]
            calls.clear()
            with monkeypatch.context() as m:
                m.setattr(rowwise_torch, "_cpp_rows", lambda *t: False)  # the torch fallback, for comparison
                ref = [rowwise_torch.row_stats(logits, targets, 0.8, True)]
                ref.append(rowwise_torch.row_grad(logits, targets, ref[0][1], g, g_h, ref[0][2], 0.8,
                                                  torch.empty_like(logits)))
                d = logits.clone()
                ref.append(rowwise_torch.logprobs_and_grad_(d, targets, 0.8, dlogp_fn, g_h) + (d,))
            tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
            for got, want in zip(cpp[0] + (cpp[1],) + cpp[2], ref[0] + (ref[1],) + ref[2], strict=True):
                torch.testing.assert_close(got, want, **tol)
            seen.clear()
    finally:
        rowwise_torch.set_row_threads(row_threads)
    # fp16, and logits whose columns are not adjacent, take the torch path
    rowwise_torch.row_stats(z.half(), targets, 1.0, False)
    rowwise_torch.row_stats(z.t().contiguous().t(), targets, 1.0, False)
    assert calls == []


def _args(**over):
    z = np.zeros((3, 8), np.float32)
    args = {"logits": z, "targets": np.array([0, 1, 7]), "inv_temperature": 1.0, "logp": np.empty(3, np.float32),
            "lse": np.empty(3, np.float32)}
    return {**args, **over}


def _grad_args(**over):
    z = np.zeros((3, 8), np.float32)
    args = {"logits": z, "targets": np.array([0, 1, 7]), "inv_temperature": 1.0, "log_norm": np.zeros(3, np.float32),
            "grad_logp": np.ones(3, np.float32), "out": np.empty_like(z)}
    return {**args, **over}


@pytest.mark.parametrize("over, match", [
    ({"logits": np.zeros((3, 8))}, "logits must be float32 or uint16 \\(bf16 bits\\), got float64"),
    ({"logits": torch.zeros(3, 8)}, "logits must be a numpy array, got Tensor"),
    ({"logits": np.zeros(8, np.float32)}, "logits must have shape \\[R, V\\] with V >= 1, got \\[8\\]"),
    ({"logits": np.zeros((3, 0), np.float32)}, "with V >= 1, got \\[3, 0\\]"),
    ({"logits": np.zeros((8, 3), np.float32).T}, "logits must have contiguous rows"),
    ({"logits": np.lib.stride_tricks.as_strided(np.zeros(12, np.float32), (3, 8), (16, 4))}, "rows must not overlap"),
    ({"targets": np.array([0, 1, 8])}, "targets\\[2\\] = 8 is out of range \\[0, 8\\)"),
    ({"targets": np.array([0, -1, 0])}, "targets\\[1\\] = -1 is out of range"),
    ({"targets": np.array([0, 1, 2], np.int32)}, "targets must be int64, got int32"),
    ({"targets": np.array([0, 1])}, "targets must have shape \\[3\\], got \\[2\\]"),
    ({"lse": np.empty(6, np.float32)[::2]}, "lse must be contiguous"),
    ({"entropy": np.empty(3, np.float64)}, "entropy must be float32, got float64"),
    ({"inv_temperature": 0.0}, "inv_temperature must be finite and > 0"),
    ({"inv_temperature": float("inf")}, "inv_temperature must be finite and > 0"),
    ({"num_threads": 0}, "num_threads must be >= 1, got 0"),
])
def test_row_stats_rejects_bad_arguments(over, match):
    with pytest.raises(ValueError, match=match):
        _tiling.row_stats(**_args(**over))


def test_row_stats_rejects_a_read_only_output():
    lse = np.empty(3, np.float32)
    lse.flags.writeable = False
    with pytest.raises(ValueError, match="lse must be writeable"):
        _tiling.row_stats(**_args(lse=lse))


def test_row_grad_rejects_bad_arguments():
    buf = np.zeros(48, np.float32)
    for over, match in [
        ({"out": np.empty((3, 8), np.uint16)}, "out must have logits' dtype and shape"),
        ({"out": np.empty((3, 9), np.float32)}, "out must have logits' dtype and shape"),
        ({"logits": buf[:24].reshape(3, 8), "out": buf[4:28].reshape(3, 8)}, "must be logits itself or not overlap"),
        ({"grad_entropy": np.zeros(3, np.float32)}, "grad_entropy and entropy go together"),
        ({"shift": np.zeros(2, np.float32)}, "shift must have shape \\[3\\]"),
        ({"grad_logp": None}, "grad_logp must be a numpy array, got NoneType"),
    ]:
        with pytest.raises(ValueError, match=match):
            _tiling.row_grad(**_grad_args(**over))
    _tiling.row_grad(**_grad_args(logits=buf[:24].reshape(3, 8), out=buf[:24].reshape(3, 8)))  # in place
    _tiling.row_grad(**_grad_args(logits=buf[24:].reshape(3, 8), out=buf[:24].reshape(3, 8)))  # adjacent, apart
