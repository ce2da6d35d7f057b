"""LLM judge throughput: judgments per second against the stub server (50 ms per reply) at 1, 8, 32, 128 in flight.

A judgment is two requests (strategy and factual, the image attached to the second), so one at a time tops out
at 1 / (2 x 50 ms) = 10 per second. It checks that 32 in flight judge >= 20x the sequential rate. The stub runs in
its own process, as a real endpoint would, so its HTTP handling does not compete with the client for the GIL.

    pytest benchmarks/test_judge.py --benchmark-only
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from grpo_fast.rewards import LLMJudge, LLMJudgeConfig

LATENCY_S = 0.05
MIN_SPEEDUP_AT_32 = 20.0
_rates: dict[int, float] = {}  # judgments per second by max_in_flight, filled as the parametrized cases run


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    command = [sys.executable, "-m", "grpo_fast.rewards.stub_server", "--port", "0", "--latency", str(LATENCY_S)]
    server = subprocess.Popen([*command, "--lifetime", "300"], stdout=subprocess.PIPE, text=True)
    try:
        banner = server.stdout.readline()  # "stub OpenAI-compatible server at http://127.0.0.1:PORT/v1 (...)"
        yield banner.split(" at ", 1)[1].split()[0]
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("judge") / "scene.png"
    Image.new("RGB", (448, 336), (40, 90, 200)).save(path)
    return path


@pytest.mark.parametrize("max_in_flight", [1, 8, 32, 128])
def test_judgments_per_second(benchmark, monkeypatch, stub_url: str, image: Path, max_in_flight: int) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "unused-by-the-stub")
    n = max(8, 4 * max_in_flight)  # completions per round: 8 requests per slot, as a G x prompts batch would give
    items = [{"question": f"What colour is shape {i}?", "level": "ambig", "image": str(image)} for i in range(n)]
    completions = [f"It is blue ({i})." for i in range(n)]
    elapsed: list[float] = []

    with LLMJudge(LLMJudgeConfig(model="stub", base_url=stub_url, max_in_flight=max_in_flight)) as judge:

        def judge_batch() -> None:
            start = time.perf_counter()
            judgments = judge.judge(items, completions)
            elapsed.append(time.perf_counter() - start)
            assert None not in judgments

        benchmark.pedantic(judge_batch, rounds=3, iterations=1, warmup_rounds=1)
        assert judge.total_stats.retries == 0 and judge.total_stats.failures == 0

    rate = n / statistics.median(elapsed[-3:])  # leaves out the warm-up round, which opens the connections
    _rates[max_in_flight] = rate
    benchmark.extra_info.update(max_in_flight=max_in_flight, completions=n, judgments_per_s=round(rate, 1))
    if 1 in _rates:
        speedup = rate / _rates[1]
        benchmark.extra_info["speedup_vs_sequential"] = round(speedup, 1)
        if max_in_flight == 32:
            assert speedup >= MIN_SPEEDUP_AT_32, f"{speedup:.1f}x the sequential rate at 32 in flight"
