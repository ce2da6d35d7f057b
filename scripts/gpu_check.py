"""`make gpu-check`: the CUDA path on a machine with one NVIDIA GPU, end to end, in about 8 minutes.

    python scripts/gpu_check.py [--out DIR] [--no-install] [--dry-run]

Steps (each one's outcome is recorded, a failure does not stop the others):
1. environment: torch, CUDA, the GPU, triton, and which `d weight` accumulation this torch gets (`lm_head`);
2. install: the peers from pip, binary wheels only (liger-kernel, trl 1.16; flash-attn where a wheel exists);
3. tests: the CUDA subset of the suite (`pytest tests -m cuda`: every device-parametrized kernel test on the GPU,
   with the triton backend running for real, and the GPU-only comparisons);
4. loss benchmark: `benchmarks/test_loss.py`'s rows (the three-GEMM floor, full logits, TRL 1.16's chunked lm
   head, Liger's LigerFusedLinearGRPOLoss, grpo_fast) at N = 8,192 and 32,768 tokens, D = 2,048 and 4,096,
   V = 151,936, in bf16 and fp32: synchronized median time of 3 rounds, allocator peak above the inputs;
5. training: 10 GRPO steps of the tiny default on CUDA with --bf16 and sdpa attention, then with
   flash_attention_2 when flash-attn imports; nothing is downloaded (the tiny model is built in);
6. torchrun: the same through `torchrun --nproc_per_node=1` (an nccl process group, so the collectives run).
The GPU targets (N = 8,192, D = 4,096, V = 151,936, bf16) are checked from step 4 and printed as PASS / FAIL:
grpo_fast's forward + backward no slower than Liger's, its peak memory at most half of Liger's and at least 3x
below full logits'. The report: gpu-check.json and gpu-check.md in --out (default: $OUT if set, else
runs/gpu-check). The exit status is 0 when every step passed and every target was met, else 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
TARGET_SHAPE, TARGET_DTYPE = "n8k-d4096", "bf16"
PEER_PACKAGES = [("liger_kernel", "liger-kernel>=0.6"), ("trl", "trl==1.16.0")]
OPTIONAL_PACKAGES = [("flash_attn", "flash-attn")]  # no wheel on most platforms: skipped, not built
# 10 GRPO steps of the tiny default: no SFT warm start, evaluation on 8 items before and after, one checkpoint
TRAIN_FLAGS = ("--preset", "tiny", "--max-steps", "10", "--bf16", "--warm-start", "false", "--eval-items", "8",
               "--save-steps", "10", "--overwrite")
TORCHRUN_STEPS = "3"


@dataclass
class StepResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


def _run(cmd: list[str], timeout: float, log: Path | None = None) -> tuple[int, str]:
    """Run `cmd` from the repository root; its return code (124 on timeout) and the tail of its output."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s"
    if log is not None:
        log.write_text(output if isinstance(output, str) else output.decode(errors="replace"))
    return code, output[-2000:] if isinstance(output, str) else ""


def train_command(out: Path, name: str, attn: str, torchrun: bool = False) -> list[str]:
    """The trainer invocation of steps 5 and 6 (flags of `python -m grpo_fast.train --help`)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1"] if torchrun else [sys.executable]
    flags = [*TRAIN_FLAGS, "--attn-implementation", attn, "--output-dir", str(out / "train"), "--name", name]
    if torchrun:
        flags[flags.index("--max-steps") + 1] = TORCHRUN_STEPS
    return [*launcher, "-m", "grpo_fast.train", *flags]


def plan(out: Path) -> list[tuple[str, str]]:
    """(step, what it runs), as --dry-run prints it."""
    shapes = "N = 8,192 and 32,768 x D = 2,048 and 4,096, V = 151,936, bf16 and fp32"
    return [
        ("environment", "torch / CUDA / GPU / triton versions; grpo_fast.kernels.lm_head.fp32_out_addmm('cuda')"),
        ("install", " ; ".join(f"{sys.executable} -m pip install --only-binary=:all: '{spec}' (if {mod} is missing)"
                               for mod, spec in PEER_PACKAGES + OPTIONAL_PACKAGES)),
        ("tests", f"{sys.executable} -m pytest tests -m cuda -q -p no:cacheprovider --junitxml {out}/cuda-tests.xml"),
        ("loss-benchmark", f"benchmarks/test_loss.py rows (floor, full logits, TRL, Liger, grpo_fast) at {shapes}"),
        ("train-sdpa", " ".join(train_command(out, "sdpa", "sdpa"))),
        ("train-flash-attention-2", " ".join(train_command(out, "flash-attention-2", "flash_attention_2"))
         + " (when flash_attn imports)"),
        ("torchrun-nccl", " ".join(train_command(out, "torchrun", "sdpa", torchrun=True))),
    ]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def environment() -> StepResult:
    import torch
    import triton

    from grpo_fast.kernels import lm_head

    if not torch.cuda.is_available():
        return StepResult("environment", "fail", detail="no CUDA device: this check needs one NVIDIA GPU")
    props = torch.cuda.get_device_properties(0)
    data = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "gpu": props.name, "capability": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "d_weight_accumulation": "addmm(out_dtype=float32)" if lm_head.fp32_out_addmm("cuda") else
            "fp32 GEMM of upcast operands"}
    return StepResult("environment", "pass", detail=f"{props.name}, torch {torch.__version__}", data=data)


def install() -> StepResult:
    missing, failed = [], []
    for module, spec in PEER_PACKAGES + OPTIONAL_PACKAGES:
        if _installed(module):
            continue
        missing.append(spec)
        code, _ = _run([sys.executable, "-m", "pip", "install", "-q", "--only-binary=:all:", spec], 240)
        if code != 0:
            failed.append(spec)
    required_failed = [s for s in failed if s in dict(PEER_PACKAGES).values()]
    detail = f"installed {sorted(set(missing) - set(failed)) or 'nothing'}; no wheel for {failed or 'none'}"
    return StepResult("install", "fail" if required_failed else "pass", detail=detail,
                      data={"missing": missing, "failed": failed})


def cuda_tests(out: Path, timeout: float) -> StepResult:
    xml = out / "cuda-tests.xml"
    code, tail = _run([sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                       "--junitxml", str(xml)], timeout, out / "cuda-tests.log")
    counts = {}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    ok = code == 0 and counts.get("tests", 0) > 0
    detail = ", ".join(f"{v} {k}" for k, v in counts.items()) or tail.splitlines()[-1:]
    return StepResult("tests", "pass" if ok else "fail", detail=str(detail), data=counts)


def loss_benchmark(deadline: float) -> StepResult:
    """Every row of benchmarks/test_loss.py at the GPU shapes; a row that does not fit in memory is recorded so."""
    import pytest
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory
    import test_loss

    device = torch.device("cuda")
    rows = []
    for shape, (b, t, d, v) in test_loss.GPU_SHAPES.items():
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            x = test_loss.make_inputs(b, t, d, v, dtype, device)
            for impl in test_loss.IMPLS:
                row = {"shape": shape, "dtype": dtype_name, "impl": impl, "N": b * t, "D": d, "V": v}
                if time.monotonic() > deadline:
                    rows.append({**row, "status": "skipped: time budget"})
                    continue
                try:
                    step = test_loss.make_step(impl, x)
                    row["peak_bytes"] = memory.peak_extra_bytes(step, device)  # the warm-up too
                    row["seconds"] = memory.median_seconds(step, device, rounds=3)
                    row["status"] = "ok"
                except pytest.skip.Exception as e:
                    row["status"] = f"skipped: {e.msg}"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "out of memory"
                rows.append(row)
                step = None
                torch.cuda.empty_cache()
            del x
            torch.cuda.empty_cache()
    measured = sum(r["status"] == "ok" for r in rows)
    ok = any(r["status"] == "ok" and r["impl"] == "grpo_fast" for r in rows)
    return StepResult("loss-benchmark", "pass" if ok else "fail", detail=f"{measured} of {len(rows)} rows measured",
                      data={"rows": rows})


def train(out: Path, name: str, attn: str, timeout: float, torchrun: bool = False) -> StepResult:
    step = "torchrun-nccl" if torchrun else f"train-{name}"
    if attn == "flash_attention_2" and not _installed("flash_attn"):
        return StepResult(step, "skip", detail="flash-attn is not installed (PyPI has no wheel for most platforms)")
    code, tail = _run(train_command(out, name, attn, torchrun), timeout, out / f"{step}.log")
    metrics = out / "train" / name / "metrics.jsonl"
    last = {}
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        last = next((r for r in reversed(lines) if "loss" in r), {})
    ok = code == 0 and isinstance(last.get("loss"), float) and math.isfinite(last["loss"])
    detail = f"exit {code}" + (f", last step {last.get('step')}: loss {last.get('loss')}" if last else "")
    return StepResult(step, "pass" if ok else "fail", detail=detail if ok else f"{detail}\n{tail}", data=last)


def targets(bench: StepResult | None) -> list[dict]:
    """The GPU targets at N = 8,192, D = 4,096, V = 151,936, bf16, from the benchmark rows: PASS / FAIL, or
    NOT MEASURED when a row is missing."""
    rows = {r["impl"]: r for r in (bench.data.get("rows", []) if bench else [])
            if r["shape"] == TARGET_SHAPE and r["dtype"] == TARGET_DTYPE and r.get("status") == "ok"}
    ours, liger, full = rows.get("grpo_fast"), rows.get("liger"), rows.get("full-logits")

    def check(name: str, peer: dict | None, value, limit, holds) -> dict:
        if ours is None or peer is None:
            return {"target": name, "status": "NOT MEASURED", "value": None, "limit": None}
        return {"target": name, "status": "PASS" if holds(value, limit) else "FAIL", "value": value, "limit": limit}

    return [
        check("fwd+bwd time <= Liger's", liger, ours and ours["seconds"], liger and liger["seconds"],
              lambda a, b: a <= b),
        check("peak memory <= 0.5x Liger's", liger, ours and ours["peak_bytes"],
              liger and 0.5 * liger["peak_bytes"], lambda a, b: a <= b),
        check("peak memory <= full logits' / 3", full, ours and ours["peak_bytes"],
              full and full["peak_bytes"] / 3, lambda a, b: a <= b),
    ]


def _mb(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f}"


def _target_value(target: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 1e3:.1f} ms" if "time" in target else f"{_mb(value)} MB"


def markdown(results: list[StepResult], goals: list[dict]) -> str:
    lines = ["# gpu-check", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for r in results:
        detail = r.detail.splitlines()[0] if r.detail else ""
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {detail} |")
    env = next((r.data for r in results if r.name == "environment"), {})
    if env:
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", f"## GPU targets ({TARGET_SHAPE}, {TARGET_DTYPE})", "", "| target | status | value | limit |",
              "|---|---|---|---|"]
    for g in goals:
        value, limit = (_target_value(g["target"], g[k]) for k in ("value", "limit"))
        lines.append(f"| {g['target']} | {g['status']} | {value} | {limit} |")
    bench = next((r for r in results if r.name == "loss-benchmark"), None)
    if bench and bench.data.get("rows"):
        lines += ["", "## Loss benchmark (forward + backward, synchronized median of 3; allocator peak above inputs)",
                  "", "| shape | dtype | impl | ms | peak MB | status |", "|---|---|---|---|---|---|"]
        for row in bench.data["rows"]:
            ms = f"{row['seconds'] * 1e3:.1f}" if "seconds" in row else ""
            lines.append(f"| {row['shape']} | {row['dtype']} | {row['impl']} | {ms} | {_mb(row.get('peak_bytes'))} "
                         f"| {row['status']} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: list[StepResult], goals: list[dict]) -> tuple[Path, Path]:
    """gpu-check.json (every step's record and the targets) and gpu-check.md (the same as tables) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"steps": [asdict(r) for r in results], "targets": goals,
              "passed": all(r.status != "fail" for r in results) and all(g["status"] == "PASS" for g in goals)}
    json_path, md_path = out / "gpu-check.json", out / "gpu-check.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(results, goals))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check"),
                        help="report folder (default: $OUT if set, else runs/gpu-check)")
    parser.add_argument("--no-install", action="store_true", help="use the installed packages only")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.dry_run:
        for name, what in plan(out):
            print(f"{name:24} {what}")
        print(f"report: {out}/gpu-check.json, {out}/gpu-check.md; budget {BUDGET_S // 60} min")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: list[StepResult] = []

    def timed(fn, *fn_args) -> StepResult:
        t0 = time.monotonic()
        try:
            result = fn(*fn_args)
        except Exception as e:  # noqa: BLE001 -- a step that crashes is a failed step; the others still run
            result = StepResult(fn.__name__, "fail", detail=f"{type(e).__name__}: {e}")
        result.seconds = time.monotonic() - t0
        detail = result.detail.splitlines()[0] if result.detail else ""
        print(f"[{time.monotonic() - start:5.0f} s] {result.name}: {result.status} {detail}", flush=True)
        results.append(result)
        return result

    env = timed(environment)
    if env.status == "pass":
        if not args.no_install:
            timed(install)
        timed(cuda_tests, out, 150)
        bench = timed(loss_benchmark, start + BUDGET_S - 150)
        timed(train, out, "sdpa", "sdpa", 90)
        timed(train, out, "flash-attention-2", "flash_attention_2", 60)
        timed(train, out, "torchrun", "sdpa", 90, True)
    else:
        bench = None
    goals = targets(bench)
    for g in goals:
        print(f"{g['status']:12} {g['target']}")
    json_path, md_path = write_report(out, results, goals)
    print(f"report: {json_path}, {md_path}")
    return 0 if json.loads(json_path.read_text())["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
