"""Compile every Triton kernel of grpo_fast.kernels for real GPUs, on a machine without one.

    python -m tests.kernels.compile_kernels [--arch 80 90]   (prints a JSON report; run without TRITON_INTERPRET)

The variants are the ones the launchers pick: the public ops run with `GRPO_FAST_BACKEND=triton` on CPU tensors
while `JITFunction.run` is replaced by a recorder, so no kernel executes and every launch (its arguments,
constexprs and `num_warps`) is captured as a GPU launch would see it. Each distinct launch is bound and
specialized exactly as `JITFunction.run` does (dtypes, 16-divisibility of pointers and ints), then compiled by
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` down to a cubin, and ptxas `-v` on its PTX
reports registers and spills; shared memory comes from the compiled metadata.

What is swept: logits fp32 and bf16, vocabularies 1,003 (a one-block row), 32,000, 151,674 (not a multiple of 16)
and 151,936; int64 and int32 targets; every flag of the row kernels; every loss type, importance-sampling level and
loss option of `grpo_loss`; every `group_advantages` scale, group sizes 1 to 1024. The hidden size D never reaches
a kernel (the GEMMs are cuBLAS's), so one small D stands for all of them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

try:  # triton internals (as of 3.9): the launch-time binder and the bundled ptxas
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as e:
    print(f"this triton ({triton.__version__}) lacks the internals the sweep uses: {e}", file=sys.stderr)
    sys.exit(77)  # the test skips on this status

import grpo_fast.kernels
from grpo_fast.kernels import group_advantages, grpo_loss, interpreter, use_backend

VOCABS = (1003, 32_000, 151_674, 151_936)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict


def triton_kernels() -> dict[str, JITFunction]:
    """Every `@triton.jit` function of the package, by `module.name` (imports the triton modules)."""
    found = {}
    for info in pkgutil.iter_modules(grpo_fast.kernels.__path__):
        module = importlib.import_module(f"grpo_fast.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = value
    return found


def _row_kernel_launches() -> None:
    from grpo_fast.kernels import rowwise_triton

    for dtype, vocab, target_dtype in itertools.product(DTYPES, VOCABS, (torch.int64, torch.int32)):
        logits = torch.zeros(2, vocab, dtype=dtype)
        targets = torch.zeros(2, dtype=target_dtype)
        ones = torch.ones(2)
        for entropy in (False, True):
            _, lse, ent = rowwise_triton.row_stats(logits, targets, 1.0, return_entropy=entropy)
            rowwise_triton.row_grad(logits, targets, lse, ones, ones if entropy else None, ent, 1.0, out=logits)


def _loss_launches() -> None:
    """grpo_loss over every loss type and level, with and without old / reference log-probs, and each option."""
    from grpo_fast.config import ImportanceSamplingLevel, LossType, choices

    params = inspect.signature(grpo_loss).parameters
    logp = -torch.rand(2, 5)
    mask = torch.ones(2, 5)
    extras = [{}, {"delta": 1.5}, {"use_bias_correction_kl": True}, {"use_bias_correction_kl": False},
              {"off_policy_mask_threshold": 0.5}, {"entropy_coef": 0.01, "entropy": torch.rand(2, 5)}]
    for loss_type, level, with_old, ref_mode, extra in itertools.product(
        choices(LossType), choices(ImportanceSamplingLevel), (False, True), ("none", "metric", "term"), extras
    ):
        kwargs = {k: v for k, v in extra.items() if k in params}
        ref = None if ref_mode == "none" else logp - 0.1
        beta = 0.04 if ref_mode == "term" else 0.0
        grpo_loss(logp, logp - 0.2 if with_old else None, ref, torch.randn(2), mask, beta=beta,
                  loss_type=loss_type, importance_sampling_level=level, **kwargs)


def _advantage_launches() -> None:
    from grpo_fast.config import ScaleRewards, choices

    for scale, group_size in itertools.product(choices(ScaleRewards), (1, 4, 16, 1024)):
        group_advantages(torch.rand(2 * group_size), group_size, scale=scale)


def capture_launches() -> list[Launch]:
    """Run the launchers with a recorder in place of `JITFunction.run`: the launches they make, none executed."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    # the row kernels' launch configuration is read at import, without the interpreter: the GPU's; only then the
    # backend check is told that triton may take CPU tensors (nothing runs on them)
    triton_kernels()
    original, JITFunction.run = JITFunction.run, record
    interpreter.TRITON_INTERPRET = True
    try:
        with use_backend("triton"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _row_kernel_launches()
            _loss_launches()
            _advantage_launches()
    finally:
        JITFunction.run = original
    return launches


def _specialize(launch: Launch, backend) -> tuple:
    """`(options, signature, constexprs, attrs)` for `launch`, as `JITFunction.run` computes them on a GPU."""
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    return fn._pack_args(backend, launch.kwargs, bound, specialization, options)


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run([get_ptxas(arch).path, f"-arch={target}", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    log = done.stdout + done.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2))}


def _jobs(launches: list[Launch], archs: tuple[int, ...], names: dict) -> list[tuple]:
    """The distinct `(name, arch, fn, signature, constexprs, attrs, options)` to compile."""
    jobs, seen = [], set()
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for launch in launches:
            options, signature, constexprs, attrs = _specialize(launch, backend)
            key = (names[launch.fn], arch, str(signature), str(constexprs), str(attrs), options.num_warps)
            if key not in seen:
                seen.add(key)
                jobs.append((names[launch.fn], arch, launch.fn, signature, constexprs, attrs, options))
    return jobs


_JOBS: list[tuple] = []  # read by the forked workers


def _compile(index: int) -> dict:
    name, arch, fn, signature, constexprs, attrs, options = _JOBS[index]
    variant = {"kernel": name, "arch": arch,
               "signature": {k: v for k, v in signature.items() if v != "constexpr"},
               "constexprs": {fn.arg_names[k[0]]: v for k, v in constexprs.items()}, "num_warps": options.num_warps}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options.__dict__)
        usage = _ptxas_usage(compiled.asm["ptx"], arch)
    except Exception as e:  # noqa: BLE001 -- every failure is reported, with its variant
        return {**variant, "error": f"{type(e).__name__}: {e}"}
    return {**variant, **usage, "shared_bytes": compiled.metadata.shared,
            "compile_s": round(time.perf_counter() - start, 3)}


def compile_all(archs: tuple[int, ...]) -> dict:
    """Capture, then compile each distinct launch on every CPU core (forked workers share the captured jobs)."""
    launches = capture_launches()
    kernels = triton_kernels()
    _JOBS[:] = _jobs(launches, archs, {fn: name for name, fn in kernels.items()})
    with multiprocessing.get_context("fork").Pool(len(os.sched_getaffinity(0))) as pool:
        done = pool.map(_compile, range(len(_JOBS)), chunksize=1)
    return {"kernels": sorted(kernels), "results": [r for r in done if "error" not in r],
            "errors": [r for r in done if "error" in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80: sm_80)")
    args = parser.parse_args()
    if interpreter.TRITON_INTERPRET:
        sys.exit("error: run without TRITON_INTERPRET: the interpreter replaces the kernels that are to be compiled")
    json.dump(compile_all(tuple(args.arch)), sys.stdout)


if __name__ == "__main__":
    main()
