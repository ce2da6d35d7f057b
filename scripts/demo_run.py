"""Measures the embedded default end to end, per seed: `python -m grpo_fast.train --seed N` from nothing (synthetic
data generated, SFT warm start, GRPO, before/after evaluation), run in a fresh working folder per seed (its data/ and
runs/ land in <out>/seed-N/), and one table of the results.

    python scripts/demo_run.py                              # seed 0, into runs/demo/seed-0 (replaced)
    python scripts/demo_run.py --seeds 0 1 2                # one after the other
    python scripts/demo_run.py --seeds 0 1 --parallel 2     # two at once, one torch thread each
    python scripts/demo_run.py --out /tmp/demo --seeds 3 -- --max-steps 200   # flags after -- go to the trainer

The table has per seed the greedy val reward before and after GRPO and the lift, the strategy accuracy on ambig and
unambig items after, the factual pass rate before -> after and the wall time; then the mean and the minimum over the
seeds (the longest wall time), the CPU model and the torch version, and how many seeds clear the bar the default is
meant to clear (BAR). Seeds run one after the other by default; with --parallel N they share the cores, so their
wall times are not those of a run alone, and the table says so. The machine may be shared: the load average before
and after each run is recorded too. Writes <out>/demo_result.json and <out>/demo_table.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from grpo_fast.machine import cpu_model

KEYS = ("eval/reward", "eval/strategy_acc_ambig", "eval/strategy_acc_unambig", "eval/factual_pass")
# What the default is meant to reach on every seed (the lift also on the mean), within 15 minutes on 2 cores.
BAR = {"lift": 0.15, "mean_lift": 0.20, "ambig": 0.6, "unambig": 0.8, "factual_drop": 0.05, "wall_seconds": 15 * 60}
REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """The CPU model (with family, model and stepping), core count and torch version."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": metadata.version("torch")}


def run_seed(seed: int, out: Path, trainer_args: list[str], parallel: bool) -> dict[str, Any]:
    """Trains the default with `seed` from nothing in the working folder `out` (replaced), so that its data, warm
    start and run land in out/data/ and out/runs/; returns its first and last evaluation, wall time and load
    average, or its exit code. In parallel mode the output goes to <out>/train.log, and torch gets one thread."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "grpo_fast.train", "--seed", str(seed)]
    cmd += [*(["--torch-threads", "1"] if parallel else []), *trainer_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if parallel else {}
    load_before, start = os.getloadavg()[0], time.perf_counter()
    if parallel:
        with open(out / "train.log", "w") as log:
            done = subprocess.run(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    else:
        done = subprocess.run(cmd, cwd=out, env=env, check=False)
    result: dict[str, Any] = {
        "seed": seed,
        "command": " ".join(cmd),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    result["load_average_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if done.returncode != 0:
        where = f" (log: {out / 'train.log'})" if parallel else ""
        return result | {"error": f"exit code {done.returncode}{where}"}
    run = next(p.parent for p in out.rglob("metrics.jsonl"))
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/reward" in r]
    before, after = evals[0], evals[-1]
    return result | {
        "steps": after["step"],
        "before": {k: before[k] for k in KEYS},
        "after": {k: after[k] for k in KEYS},
    }


def seed_row(result: dict[str, Any]) -> dict[str, Any]:
    """The table's values for one seed's result."""
    before, after = result["before"], result["after"]
    return {
        "seed": result["seed"],
        "before": before["eval/reward"],
        "after": after["eval/reward"],
        "lift": after["eval/reward"] - before["eval/reward"],
        "ambig": after["eval/strategy_acc_ambig"],
        "unambig": after["eval/strategy_acc_unambig"],
        "factual_before": before["eval/factual_pass"],
        "factual_after": after["eval/factual_pass"],
        "wall_seconds": result["wall_seconds"],
    }


def meets_bar(row: dict[str, Any]) -> bool:
    return (
        row["lift"] >= BAR["lift"]
        and row["ambig"] >= BAR["ambig"]
        and row["unambig"] >= BAR["unambig"]
        and row["factual_before"] - row["factual_after"] <= BAR["factual_drop"]
        and row["wall_seconds"] <= BAR["wall_seconds"]
    )


def summarize(results: list[dict[str, Any]], info: dict[str, Any], parallel: int) -> dict[str, Any]:
    """The whole table as data: a row per successful seed, their mean and minimum (the longest wall time), the
    machine, how the seeds ran, the bar and which seeds clear it."""
    rows = [seed_row(r) for r in results if "error" not in r]
    columns = [k for k in rows[0] if k != "seed"] if rows else []
    mean = {k: statistics.fmean(r[k] for r in rows) for k in columns}
    low = {k: (max if k == "wall_seconds" else min)(r[k] for r in rows) for k in columns}
    return {
        "machine": info,
        "parallel": parallel,
        "rows": rows,
        "mean": mean,
        "min": low,
        "bar": BAR,
        "seeds_meeting_bar": [r["seed"] for r in rows if meets_bar(r)],
        "mean_lift_meets_bar": bool(rows) and mean["lift"] >= BAR["mean_lift"],
        "failed": [{"seed": r["seed"], "error": r["error"]} for r in results if "error" in r],
        "runs": results,
    }


def markdown(table: dict[str, Any]) -> str:
    """The table of `summarize` in Markdown, with the machine, the run mode and the bar below it."""
    lines = [
        "| seed | before | after | lift | ambig | unambig | factual | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labelled = [(str(r["seed"]), r) for r in table["rows"]]
    if table["rows"]:
        labelled += [("mean", table["mean"]), ("min", table["min"])]
    for label, r in labelled:
        cells = [
            label,
            f"{r['before']:.3f}",
            f"{r['after']:.3f}",
            f"{r['lift']:+.3f}",
            f"{r['ambig']:.2f}",
            f"{r['unambig']:.2f}",
            f"{r['factual_before']:.2f} → {r['factual_after']:.2f}",
            f"{r['wall_seconds'] / 60:.1f} min" + (" (max)" if label == "min" else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    info, parallel = table["machine"], table["parallel"]
    mode = "one after the other"
    if parallel > 1:
        mode = f"{parallel} at a time, one torch thread each (wall times are not those of a run alone)"
    bar, met = table["bar"], len(table["seeds_meeting_bar"])
    wanted = (
        f"lift >= +{bar['lift']:.2f} on every seed and >= +{bar['mean_lift']:.2f} on the mean, strategy accuracy "
        f">= {bar['ambig']:.1f} ambig and >= {bar['unambig']:.1f} unambig, factual pass at most "
        f"{bar['factual_drop']:.2f} below the warm start's, wall time <= {bar['wall_seconds'] / 60:.0f} min"
    )
    mean_verdict = "meets" if table["mean_lift_meets_bar"] else "misses"
    lines += [
        "",
        f"{info['cpu']} ({info['cores']} cores), torch {info['torch']}; seeds run {mode}.",
        f"Bar: {wanted}. Met by {met} of {len(table['rows'])} seeds; the mean lift {mean_verdict} it.",
    ]
    lines += [f"Seed {f['seed']} failed: {f['error']}." for f in table["failed"]]
    return "\n".join(lines)


def write_table(table: dict[str, Any], out: Path) -> str:
    """<out>/demo_result.json and <out>/demo_table.md; returns the Markdown."""
    text = markdown(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_result.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "demo_table.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="parent of the per-seed folders seed-N/ (each replaced)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run, each from nothing")
    parser.add_argument("--parallel", type=int, default=1, help="seeds run at once (more than 1: one thread each)")
    parser.add_argument("trainer_args", nargs="*", help="extra flags for grpo_fast.train (after --)")
    args = parser.parse_args()
    if any(a.split("=")[0] == "--seed" for a in args.trainer_args):
        parser.error("--seed is set per run by this script: pass --seeds")
    if args.parallel < 1 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--parallel must be >= 1 and --seeds must not repeat")
    out, parallel = Path(args.out).resolve(), args.parallel > 1

    def one(seed: int) -> dict[str, Any]:
        print(f"seed {seed}: training into {out / f'seed-{seed}'}", flush=True)
        result = run_seed(seed, out / f"seed-{seed}", args.trainer_args, parallel)
        lift = result["after"]["eval/reward"] - result["before"]["eval/reward"] if "error" not in result else None
        status = result.get("error") or f"lift {lift:+.3f}"
        print(f"seed {seed}: {status} in {result['wall_seconds'] / 60:.1f} min", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(one, args.seeds))
    print(write_table(summarize(results, machine(), args.parallel), out))
    if any("error" in r for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
