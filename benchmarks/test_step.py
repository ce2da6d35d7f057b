"""Seconds per GRPO step: grpo_fast against TRL's GRPOTrainer on the same tiny InternVL, data, prompts and settings.

Both sides train the tiny preset's step on the built-in InternVL (random init, seed 0, no warm start, fp32, CPU) at
half its batch: G = 4, 32 completions (8 prompts; the preset takes 16), at most 40 completion tokens, temperature
0.7, beta 0.04 with a frozen reference, DAPO loss, lr 1e-4 cosine after 5 warm-up steps, the rule judge as the
reward, and, unlike the preset, the whole model trained and every group in the loss, as TRL does. The 8 prompts are
the same 8 items on both sides, so every step sees the same prompts (token for token: TRL's processor expands the
image tokens as `grpo_fast.models.inputs.collate` does). Each measurement is a fresh process
(`python benchmarks/test_step.py --worker ...`) that runs STEPS steps and reports the median step after the first
(warm-up) and its peak RSS; a row is the median over RUNS processes, at 1 and 2 torch threads and, for grpo_fast,
"auto" (`grpo_fast.threads`, the trainer's default), each on the idle machine and beside one busy process (printed,
and in each row's `extra_info`; the pytest-benchmark table itself times whole processes, start-up included).
grpo_fast's rows also give its time split per step (`time/generate`, `time/reward`, `time/logprobs`, `time/update`).

TRL needs a processor for the tiny model: HF's `InternVLProcessor` wants a video processor (torchvision, absent
here) and a tokenizer with a video token, so `_TinyInternVLProcessor` below is the same processor without the
video half. The TRL rows are skipped when trl is not installed.

Step times depend on what else the machine runs: the header gives the load average when the module starts. The
target, grpo_fast at least MIN_SPEEDUP x faster than TRL per step, is asserted when the machine started idle
(1-minute load average below IDLE_LOAD) and only recorded (`speedup_vs_trl`) otherwise.

    pytest benchmarks/test_step.py --benchmark-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from grpo_fast.machine import cpu_model

STEPS = 3  # per process: one warm-up step, then the measured ones
RUNS = int(os.environ.get("GRPO_FAST_BENCH_RUNS", "4"))  # fresh processes per row
PROMPTS = 8  # = 32 completions / G
SETTINGS = {
    "num_generations": 4,
    "batch_size": 32,
    "max_completion_length": 40,
    "temperature": 0.7,
    "beta": 0.04,
    "learning_rate": 1e-4,
    "warmup_steps": 5,
    "loss_type": "dapo",
    "freeze_vision_tower": False,  # TRL trains the whole model
    "mask_zero_std_groups": False,  # TRL has no group filter: every group in the loss
}
MIN_SPEEDUP = 2.0
IDLE_LOAD = 0.5
_START_LOAD = os.getloadavg()[0]
_results: dict[tuple[str, int, str], dict[str, float]] = {}  # (impl, threads, load) -> medians over the processes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, say) -> Path:
    import torch

    from grpo_fast.data.synthetic import write_dataset

    folder = tmp_path_factory.mktemp("step")
    write_dataset(folder, 24, seed=0)
    try:
        import trl

        peer = f"trl {trl.__version__}"
    except ImportError:
        peer = "trl not installed"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (
        f"CPU: {cpu_model()} ({os.cpu_count()} cores), ISA path: {torch.backends.cpu.get_cpu_capability()}, "
        f"torch {torch.__version__}, {peer}, threads per row: 1, 2 and auto, load average (1, 5, 15 min): {load}"
    )
    say(f"\n{header}")
    return folder


def _measure(impl: str, threads: int, data: Path, busy: bool) -> dict[str, Any]:
    """One fresh process: its per-step seconds (after warm-up), peak RSS, resolved thread count and, for grpo_fast,
    the time split; with `busy`, beside a process that keeps one core busy."""
    cmd = [sys.executable, __file__, "--worker", impl, "--threads", str(threads), "--data", str(data)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    root = Path(__file__).parents[1]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900, cwd=root)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (impl, threads, load): TRL idle at 1 and 2 threads; grpo_fast at 1, 2 and auto (0: grpo_fast.threads), idle and
# beside one busy process (a spinning Python), the two cases the thread policy chooses between
ROWS = [("trl", t, "idle") for t in (1, 2)] + [("grpo_fast", t, load) for load in ("idle", "busy") for t in (1, 2, 0)]


@pytest.mark.parametrize(("impl", "threads", "load"), ROWS, ids=[f"{i}-{t or 'auto'}-{ld}" for i, t, ld in ROWS])
def test_seconds_per_step(benchmark, say, data_dir: Path, impl: str, threads: int, load: str) -> None:
    if impl == "trl":
        pytest.importorskip("trl", reason="the peer row needs trl (pip install 'grpo_fast[bench]')")
    runs: list[dict[str, Any]] = []
    named = f"{threads} thread(s)" if threads else "auto threads"
    benchmark.group = f"GRPO step, tiny InternVL, G=4, 32 completions, 40 tokens, {named}, {load}"
    benchmark.pedantic(
        lambda: runs.append(_measure(impl, threads, data_dir, load == "busy")), rounds=RUNS, iterations=1
    )
    row = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "steps"}
    _results[(impl, threads, load)] = row
    benchmark.extra_info.update({k: round(v, 3) for k, v in row.items()}, processes=len(runs), steps=STEPS - 1)
    line = f"{named}, {load}, {impl}: {row['step_s']:.2f} s per step, peak RSS {row['peak_rss_mb']:.0f} MB"
    if not threads:
        line += f", resolved to {sorted({r['threads'] for r in runs})} thread(s)"
    if impl == "grpo_fast":
        split = ", ".join(f"{k.removeprefix('time/')} {row[k]:.2f}" for k in row if k.startswith("time/"))
        line += f" ({split} s)"
    say(line)
    if impl == "grpo_fast" and load == "idle" and ("trl", threads, load) in _results:
        speedup = _results[("trl", threads, load)]["step_s"] / row["step_s"]
        benchmark.extra_info["speedup_vs_trl"] = round(speedup, 2)
        say(f"{named}: grpo_fast is {speedup:.2f}x TRL's speed per step (target {MIN_SPEEDUP}x)")
        if _START_LOAD < IDLE_LOAD:
            assert speedup >= MIN_SPEEDUP, f"{speedup:.2f}x TRL at {named}, target {MIN_SPEEDUP}x"


# -- the worker (runs in its own process) ------------------------------------------------------------------------


def _items(data: Path) -> list[dict[str, Any]]:
    from grpo_fast.data import load_seed

    return load_seed(data / "train.jsonl")[:PROMPTS]


def _run_grpo_fast(data: Path, threads: int) -> dict[str, Any]:
    import copy

    import torch

    from grpo_fast.config import build_config
    from grpo_fast.distributed import DistEnv
    from grpo_fast.models import load_policy
    from grpo_fast.rewards import RuleJudge
    from grpo_fast.trainer import GRPOTrainer

    cfg = build_config({**SETTINGS, "warm_start": False, "torch_threads": threads, "max_steps": STEPS})
    policy = load_policy("tiny", seed=0)
    ref = copy.deepcopy(policy.model).eval().requires_grad_(False)
    trainer = GRPOTrainer(
        cfg, policy, _items(data), DistEnv(0, 1, torch.device("cpu")), judge=RuleJudge(), ref_model=ref
    )
    steps = [trainer.train_step()[0] for _ in range(STEPS)][1:]
    out: dict[str, Any] = {"step_s": statistics.median(s.step_time for s in steps)}
    for phase in ("generate", "reward", "logprobs", "update"):
        out[f"time/{phase}"] = statistics.median(getattr(s, f"time_{phase}") for s in steps)
    out["completion_length"] = statistics.mean(s.completion_length for s in steps)
    return out


def _tiny_internvl_processor(policy):
    """HF's InternVLProcessor for the tiny model, without its video half (a video processor needs torchvision)."""
    import re

    from transformers import InternVLProcessor, ProcessorMixin

    class _TinyInternVLProcessor(InternVLProcessor):
        def __init__(self, image_processor, tokenizer, image_seq_length: int, chat_template: str) -> None:
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token, self.image_token_id = tokenizer.context_image_token, tokenizer.context_image_token_id
            self.video_token = "<video>"  # never in these prompts
            image, video = re.escape(self.image_token), re.escape(self.video_token)
            self.multimodal_pattern = re.compile(f"(?P<image>{image})|(?P<video>{video})")

    tok = policy.tokenizer
    return _TinyInternVLProcessor(policy.tiling.image_processor(), tok, policy.image_seq_length, tok.chat_template)


def _run_trl(data: Path, threads: int, workdir: Path) -> dict[str, Any]:
    import time

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_fast.models import load_policy
    from grpo_fast.models.inputs import load_rgb
    from grpo_fast.rewards import RuleJudge
    from grpo_fast.rewards.judge import JudgeReward

    items = _items(data)
    policy = load_policy("tiny", seed=0)
    policy.save(workdir / "model")  # TRL builds its reference model from the policy's path
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": it["question"]}], "image": load_rgb(it["image"]), "row": i}
            for i, it in enumerate(items)
        ]
    )
    judge = JudgeReward(RuleJudge())

    def rule(prompts, completions, row, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return judge(prompts, texts, **{k: [items[i][k] for i in row] for k in items[0]})

    seconds: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    args = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=SETTINGS["batch_size"],
        num_generations=SETTINGS["num_generations"],
        max_completion_length=SETTINGS["max_completion_length"],
        temperature=SETTINGS["temperature"],
        beta=SETTINGS["beta"],
        learning_rate=SETTINGS["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=SETTINGS["warmup_steps"],
        loss_type=SETTINGS["loss_type"],
        max_steps=STEPS,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=str(workdir / "model"),
        reward_funcs=rule,
        args=args,
        train_dataset=dataset,
        processing_class=_tiny_internvl_processor(policy),
        callbacks=[Clock()],
    )
    trainer.train()
    return {"step_s": statistics.median(seconds[1:]), "completion_length": statistics.mean(lengths[1:])}


def _worker(argv: list[str]) -> None:
    import resource
    import tempfile

    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["grpo_fast", "trl"], required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args(argv)
    from grpo_fast.threads import resolve_threads

    threads = resolve_threads(args.threads)  # 0: auto, as the trainer resolves it
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as workdir:
        if args.worker == "grpo_fast":
            out = _run_grpo_fast(args.data, threads)
        else:
            out = _run_trl(args.data, threads, Path(workdir))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out["threads"] = threads
    print(json.dumps(out))


if __name__ == "__main__":
    _worker(sys.argv[1:])
