"""Every Triton kernel compiles for sm_80 and sm_90 in every variant its launcher picks, without register spills,
on this machine with or without a GPU (see `tests/kernels/compile_kernels.py`). The summary (variants, registers,
spills, shared memory per kernel and architecture) is printed at the end of the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ARCHS = (80, 90)
COMPILE_REPORT = pytest.StashKey[list[str]]()


def _compile_report() -> dict:
    # a fresh interpreter without TRITON_INTERPRET: under the interpreter the kernels are not JIT functions
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning
    done = subprocess.run([sys.executable, "-m", "tests.kernels.compile_kernels", "--arch", *map(str, ARCHS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode == 77:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def _summary(results: list[dict]) -> list[str]:
    lines = [f"{'kernel':42} {'arch':>5} {'variants':>8} {'max regs':>8} {'spill B':>7} {'max smem B':>10}"]
    for kernel, arch in sorted({(r["kernel"], r["arch"]) for r in results}):
        rows = [r for r in results if (r["kernel"], r["arch"]) == (kernel, arch)]
        lines.append(f"{kernel:42} {'sm_' + str(arch):>5} {len(rows):>8} {max(r['registers'] for r in rows):>8} "
                     f"{max(r['spill_bytes'] for r in rows):>7} {max(r['shared_bytes'] for r in rows):>10}")
    return lines


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(request):
    report = _compile_report()
    errors = [f"{e['kernel']} sm_{e['arch']} {e['constexprs']} {e['signature']}: {e['error']}" for e in report["errors"]]
    assert not errors, "\n".join(errors)
    results = report["results"]
    request.config.stash[COMPILE_REPORT] = _summary(results)
    compiled = {(r["kernel"], r["arch"]) for r in results}
    missing = [f"{k} sm_{a}" for k in report["kernels"] for a in ARCHS if (k, a) not in compiled]
    assert not missing, f"never launched by the compile sweep (add its launcher to compile_kernels.py): {missing}"
    spills = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['spill_bytes']} B" for r in results if r["spill_bytes"]]
    assert not spills, f"register spills: {spills}"
