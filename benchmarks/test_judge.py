"""LLM judge throughput: judgments per second against the stub server (50 ms per reply) at 1, 8, 32, 128 in flight.

A judgment is two requests (strategy and factual, the image attached to the second), so one at a time tops out
at 1 / (2 x 50 ms) = 10 per second. It checks that 32 in flight judge >= 20x the sequential rate and 128 in flight
>= 30x. The stub runs in its own process, as a real endpoint would, so its HTTP handling does not compete with the
client for the GIL; past a few requests in flight the client's own CPU per request sets the pace, and each case
reports it (`client_cpu_ms_per_request`: the process time of the timed rounds over the requests they sent).

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
MIN_SPEEDUP = {32: 20.0, 128: 30.0}  # x the sequential rate, by max_in_flight
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
    cpu_s: list[float] = []
    requests: list[int] = []

    with LLMJudge(LLMJudgeConfig(model="stub", base_url=stub_url, max_in_flight=max_in_flight)) as judge:

        def judge_batch() -> None:
            start, cpu_start = time.perf_counter(), time.process_time()
            judgments = judge.judge(items, completions)
            elapsed.append(time.perf_counter() - start)
            cpu_s.append(time.process_time() - cpu_start)
            requests.append(judge.last_stats.requests)
            assert None not in judgments

        benchmark.pedantic(judge_batch, rounds=3, iterations=1, warmup_rounds=1)
        assert judge.total_stats.retries == 0 and judge.total_stats.failures == 0

    rate = n / statistics.median(elapsed[-3:])  # [-3:]: not the warm-up round, which opens the connections
    cpu_ms = 1e3 * sum(cpu_s[-3:]) / sum(requests[-3:])
    _rates[max_in_flight] = rate
    benchmark.extra_info.update(
        max_in_flight=max_in_flight,
        completions=n,
        judgments_per_s=round(rate, 1),
        client_cpu_ms_per_request=round(cpu_ms, 3),
    )
    if 1 in _rates:
        speedup = rate / _rates[1]
        benchmark.extra_info["speedup_vs_sequential"] = round(speedup, 1)
        if max_in_flight in MIN_SPEEDUP:
            assert speedup >= MIN_SPEEDUP[max_in_flight], (
                f"{speedup:.1f}x the sequential rate at {max_in_flight} in flight (client CPU {cpu_ms:.2f} ms a request)"
            )
