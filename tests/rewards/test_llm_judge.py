"""LLMJudge end to end: the real `openai` client against the scripted OpenAI-compatible stub on 127.0.0.1."""

from __future__ import annotations

import base64
import dataclasses
import random
import re
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from grpo_fast.rewards import JudgeReward, Judgment
from grpo_fast.rewards.llm_judge import JudgeRequestError, JudgeUnavailableError, LLMJudge, LLMJudgeConfig
from grpo_fast.rewards.stub_server import FAULT_NAMES, Faults, StubReply, StubRequest, StubServer


def scripted(request: StubRequest) -> str:
    """Replies from the answer under judgment: "s3-FAIL" scores strategy 3 and fails the factual check."""
    score, verdict = re.search(r"Answer: s(\d)-(PASS|FAIL)", request.text).groups()
    return f"<verdict>{verdict}</verdict>" if request.image_urls else f"Sounds right.\n<score>{score}</score>"


class Flaky:
    """Each distinct request first gets `failures` (in order), then `scripted`'s reply."""

    def __init__(self, *failures: StubReply | str) -> None:
        self.failures = failures
        self.seen: Counter[str] = Counter()

    def __call__(self, request: StubRequest) -> StubReply | str:
        attempt = self.seen[request.text]
        self.seen[request.text] += 1
        return self.failures[attempt] if attempt < len(self.failures) else scripted(request)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    Image.new("RGB", (12, 8), (200, 30, 30)).save(path)
    return path


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def items_for(image: Path, n: int, level: str = "ambig") -> list[dict]:
    return [{"question": f"What colour is shape {i}?", "level": level, "image": str(image)} for i in range(n)]


def judge_for(server: StubServer, **overrides) -> LLMJudge:
    config = {"model": "judge-model", "base_url": server.url, "backoff_base_s": 0.01, "timeout_s": 5.0} | overrides
    return LLMJudge(LLMJudgeConfig(**config))


@pytest.mark.parametrize("api, route", [("chat", "/v1/chat/completions"), ("responses", "/v1/responses")])
def test_scripted_scores_give_the_rubric_rewards(image: Path, api: str, route: str) -> None:
    completions = ["s1-PASS", "s2-PASS", "s3-FAIL", "s4-PASS", "s4-FAIL", "s1-FAIL"]
    with StubServer(scripted) as server, judge_for(server, api=api) as judge:
        reward = JudgeReward(judge)
        items = items_for(image, len(completions))
        columns = {key: [item[key] for item in items] for key in items[0]}
        rewards = reward([None] * len(completions), completions, **columns)
    # 1 -> 0.0; 2 -> 0.6; 3 - 0.3 -> 0.5; 4 -> 1.0; 4 - 0.3 -> 0.7; 1 - 0.3 clamped at 0.0
    assert rewards == pytest.approx([0.0, 0.6, 0.5, 1.0, 0.7, 0.0])
    assert {r.path for r in server.requests} == {route}
    assert judge.last_stats.requests == 12 and judge.last_stats.unscorable == 0


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("size", [(12, 8), (320, 240)])  # the large one: ~230 KB of noise, many socket buffers
def test_the_image_arrives_with_the_factual_prompt_only(tmp_path: Path, api: str, size: tuple[int, int]) -> None:
    image = tmp_path / "noise.png"
    Image.frombytes("RGB", size, random.Random(0).randbytes(3 * size[0] * size[1])).save(image)
    with StubServer(scripted) as server, judge_for(server, api=api) as judge:
        assert judge.judge(items_for(image, 1, level="unambig"), ["s4-PASS"]) == [Judgment(4, True)]
    factual = [r for r in server.requests if r.image_urls]
    strategy = [r for r in server.requests if not r.image_urls]
    assert len(factual) == len(strategy) == 1
    prefix, payload = factual[0].image_urls[0].split(",", 1)
    assert prefix == "data:image/png;base64"
    assert base64.b64decode(payload) == image.read_bytes()
    for request in (factual[0], strategy[0]):
        assert "What colour is shape 0?" in request.text and "s4-PASS" in request.text
        assert request.body["model"] == "judge-model"
    assert "Data type: unambiguous" in strategy[0].text


def test_requests_carry_the_openai_clients_endpoint_key_and_headers(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests are built by the judge, from what the openai client resolved: $OPENAI_BASE_URL when base_url is
    None, the key as a bearer token, the organisation and project from their variables."""
    monkeypatch.setenv("OPENAI_ORG_ID", "org-judge")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-judge")
    with StubServer(scripted) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        with LLMJudge(LLMJudgeConfig(model="judge-model")) as judge:
            assert judge.judge(items_for(image, 1), ["s3-PASS"]) == [Judgment(3, True)]
    assert len(server.requests) == 2
    for request in server.requests:
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == "Bearer sk-test"
        assert (request.headers["openai-organization"], request.headers["openai-project"]) == (
            "org-judge",
            "proj-judge",
        )
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"].startswith("AsyncOpenAI/Python")


def test_a_batch_is_judged_concurrently(image: Path) -> None:
    # 64 completions = 128 requests of 100 ms: 12.8 s one at a time, 0.4 s with 32 in flight.
    with StubServer(scripted, latency_s=0.1) as server, judge_for(server, max_in_flight=32) as judge:
        start = time.perf_counter()
        judgments = judge.judge(items_for(image, 64), [f"s{1 + i % 4}-PASS" for i in range(64)])
        elapsed = time.perf_counter() - start
    assert [j.strategy for j in judgments] == [1 + i % 4 for i in range(64)]
    assert elapsed < 3.2, f"64 completions took {elapsed:.2f} s: requests did not overlap"
    assert 16 <= server.peak_in_flight <= 32


@pytest.mark.parametrize("max_in_flight", [3, 20])  # 20: three connection pools of 7 (judge_http.POOL_SIZE = 8)
def test_requests_in_flight_never_exceed_the_limit(image: Path, max_in_flight: int) -> None:
    n = 2 * max_in_flight
    with StubServer(scripted, latency_s=0.2) as server, judge_for(server, max_in_flight=max_in_flight) as judge:
        judge.judge(items_for(image, n), ["s2-PASS"] * n)
    assert len(server.requests) == 2 * n
    # near the limit: requests do not queue for one pool's connections while another pool has free ones
    assert max_in_flight * 3 // 4 <= server.peak_in_flight <= max_in_flight


def test_identical_requests_are_sent_once(image: Path) -> None:
    item = items_for(image, 1)[0]
    with StubServer(scripted) as server, judge_for(server) as judge:
        judgments = judge.judge([item] * 4, ["s3-PASS"] * 3 + ["s2-PASS"])
    assert judgments == [Judgment(3, True)] * 3 + [Judgment(2, True)]
    assert len(server.requests) == 4  # (strategy, factual) x 2 distinct completions


@pytest.mark.parametrize("status", [500, 503, 408])
def test_transient_status_is_retried(image: Path, status: int) -> None:
    with StubServer(Flaky(StubReply(status=status), StubReply(status=502))) as server, judge_for(server) as judge:
        assert judge.judge(items_for(image, 1), ["s3-PASS"]) == [Judgment(3, True)]
    assert judge.last_stats.retries == 4 and judge.last_stats.requests == 6 and judge.last_stats.failures == 0


def test_429_waits_for_retry_after(image: Path) -> None:
    rate_limited = StubReply("slow down", status=429, headers={"Retry-After": "0.5"})
    with StubServer(Flaky(rate_limited)) as server, judge_for(server, backoff_base_s=0.001) as judge:
        assert judge.judge(items_for(image, 1), ["s4-FAIL"]) == [Judgment(4, False)]
    by_prompt: dict[str, list[float]] = {}
    for request in server.requests:
        by_prompt.setdefault(request.text, []).append(request.arrived)
    gaps = [later - first for first, later in by_prompt.values()]
    assert len(gaps) == 2 and min(gaps) >= 0.45, gaps  # the backoff alone would wait about 1 ms
    assert judge.last_stats.retries == 2


def test_timeouts_are_retried(image: Path) -> None:
    hang = StubReply(delay_s=5.0)
    with StubServer(Flaky(hang)) as server, judge_for(server, timeout_s=0.3) as judge:
        start = time.perf_counter()
        assert judge.judge(items_for(image, 1), ["s2-PASS"]) == [Judgment(2, True)]
        assert time.perf_counter() - start < 3.0
    assert judge.last_stats.retries == 2 and len(server.requests) == 4


@pytest.mark.parametrize(
    "fault",
    [
        StubReply(raw=b'{"id": "chatcmpl-1", "choices": [{"mess'),  # cut short
        StubReply(raw=b"<html><body>502 Bad Gateway</body></html>"),  # a proxy's page, labelled JSON
        StubReply(raw=b'{"object": "error"}'),  # JSON, but no reply
        StubReply(drop=True),  # the connection closed without an answer
    ],
)
def test_malformed_bodies_and_dropped_connections_are_retried(image: Path, fault: StubReply) -> None:
    with StubServer(Flaky(fault)) as server, judge_for(server) as judge:
        assert judge.judge(items_for(image, 1), ["s3-FAIL"]) == [Judgment(3, False)]
    assert (judge.last_stats.retries, judge.last_stats.requests, len(server.requests)) == (2, 4, 4)


def test_every_fault_the_stub_injects_is_counted_by_both_sides(image: Path) -> None:
    """A batch under every kind of fault: each completion is scored or unscorable, and the judge's counters agree
    with the server's (requests sent = received; garbage = unparsed replies; other faults = retries + failures)."""
    faults = Faults(server_error=0.1, rate_limit=0.1, timeout=0.05, garbage=0.1, malformed=0.05, dropped=0.1)
    faults = dataclasses.replace(faults, retry_after_s=0.01, hang_s=5.0, seed=1)
    # timeout_s well under hang_s (so "timeout" faults time out) but far above the accept latency of a loaded machine:
    # a client timeout before the server has read the request would be a request sent that the server never saw
    with StubServer(scripted, faults=faults) as server, judge_for(server, timeout_s=2.0, max_retries=8) as judge:
        completions = [f"s{1 + i % 4}-{'PASS' if i % 3 else 'FAIL'}" for i in range(40)]
        judgments = judge.judge(items_for(image, 40), completions)
    stats = judge.last_stats
    assert len(judgments) == 40 and stats.unscorable == judgments.count(None)
    assert all(
        j is None or (j.strategy, j.factual_pass) == (int(c[1]), c.endswith("PASS"))
        for j, c in zip(judgments, completions)
    )
    assert stats.requests == len(server.requests) == sum(server.counts.values()) > 80
    assert all(server.counts[name] > 0 for name in FAULT_NAMES)
    assert stats.unparsed == server.counts["garbage"]
    transient = sum(server.counts[name] for name in FAULT_NAMES if name != "garbage")
    assert stats.retries + stats.failures == transient


def test_faults_are_drawn_from_their_seed() -> None:
    faults = Faults(server_error=0.3, garbage=0.2, dropped=0.1, seed=7)
    draws = [[faults.draw(rng) for _ in range(2000)] for rng in (random.Random(7), random.Random(7))]
    assert draws[0] == draws[1]
    shares = Counter(draws[0])
    for name, rate in (("server_error", 0.3), ("garbage", 0.2), ("dropped", 0.1), (None, 0.4)):
        assert shares[name] / 2000 == pytest.approx(rate, abs=0.04), name
    assert Faults.parse("server_error=0.3, garbage=0.2,dropped=0.1,seed=7") == faults
    with pytest.raises(ValueError, match="sum to at most 1"):
        Faults(server_error=0.6, timeout=0.5)
    with pytest.raises(ValueError, match="bad fault 'oops=1'"):
        Faults.parse("oops=1")


def test_a_stopped_server_closes_its_kept_alive_connections(image: Path) -> None:
    """A restart on the same port: the judge's pooled connection to the old server fails, and is retried."""
    first = StubServer(scripted).start()
    with judge_for(first) as judge:
        assert judge.judge(items_for(image, 1), ["s2-PASS"]) == [Judgment(2, True)]
        first.stop()
        with StubServer(scripted, port=first.port) as second:
            assert judge.judge(items_for(image, 1), ["s4-FAIL"]) == [Judgment(4, False)]
            # the closed connections were seen as closed before reuse: fresh ones, and no request failed on them
            assert judge.last_stats.retries == 0
    assert len(first.requests) == 2 and len(second.requests) == 2


def test_a_request_that_keeps_failing_makes_its_completion_unscorable(image: Path) -> None:
    def reply(request: StubRequest) -> StubReply | str:
        return StubReply(status=503) if "s1-FAIL" in request.text else scripted(request)

    with StubServer(reply) as server, judge_for(server, max_retries=2) as judge:
        judgments = judge.judge(items_for(image, 3), ["s4-PASS", "s1-FAIL", "s3-PASS"])
    assert judgments == [Judgment(4, True), None, Judgment(3, True)]
    stats = judge.last_stats
    assert (stats.failures, stats.retries, stats.unscorable) == (2, 4, 1)
    assert sum("s1-FAIL" in r.text for r in server.requests) == 6  # 2 prompts x (1 try + 2 retries)


def test_an_unreachable_endpoint_stops_the_run(image: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = LLMJudgeConfig(model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_base_s=0.01)
    with LLMJudge(config) as judge, pytest.raises(JudgeUnavailableError, match=f"127.0.0.1:{port}"):
        judge.judge(items_for(image, 2), ["s1-PASS", "s2-PASS"])
    assert (judge.last_stats.failures, judge.last_stats.retries) == (4, 8)


def test_a_reply_of_many_reads_arrives_whole(image: Path) -> None:
    # 3 MB: dozens of socket reads on the connection, handed on in 64 KB pieces (httpcore's read size)
    with StubServer(lambda r: "x" * 3_000_000 + scripted(r)) as server, judge_for(server) as judge:
        assert judge.judge(items_for(image, 1), ["s2-FAIL"]) == [Judgment(2, False)]


def test_garbage_is_asked_again_once_then_unscorable_never_scored_1(image: Path) -> None:
    def reply(request: StubRequest) -> str:
        if "garbage" in request.text:  # out-of-range score; a verdict that is neither PASS nor FAIL
            return "<verdict>MAYBE</verdict>" if request.image_urls else "<score>7</score>"
        return scripted(request)

    flaky_once = Flaky("The answer looks fine to me.")  # no score and no verdict, then a good reply
    with StubServer(lambda r: reply(r) if "garbage" in r.text else flaky_once(r)) as server, judge_for(server) as judge:
        judgments = judge.judge(items_for(image, 2), ["s4-PASS", "garbage"])
    assert judgments == [Judgment(4, True), None]
    stats = judge.last_stats
    assert (stats.reasks, stats.unscorable, stats.failures) == (4, 1, 0)  # 2 prompts x 2 completions re-asked
    assert sum("garbage" in r.text for r in server.requests) == 4  # each prompt asked exactly twice


@pytest.mark.parametrize(
    "status, hint", [(400, "images"), (401, "$OPENAI_API_KEY"), (403, "may not use"), (404, "--judge-model")]
)
def test_client_errors_stop_the_run_without_retry(image: Path, status: int, hint: str) -> None:
    refuse = StubServer(lambda r: StubReply("no way", status=status))
    with refuse as server, judge_for(server) as judge, pytest.raises(JudgeRequestError) as error:
        judge.judge(items_for(image, 3), ["s1-PASS", "s2-PASS", "s3-PASS"])
    message = str(error.value)
    assert f"HTTP {status}" in message and "judge-model" in message and hint in message and "no way" in message
    assert judge.last_stats.retries == 0
    assert max(Counter(r.text for r in server.requests).values()) == 1


def test_the_cache_answers_a_rerun(image: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "judge.sqlite")
    items, completions = items_for(image, 5), ["s1-PASS", "s2-FAIL", "s3-PASS", "s4-PASS", "s4-FAIL"]
    with StubServer(scripted) as server:
        with judge_for(server, cache_path=cache) as judge:
            first = judge.judge(items, completions)
        assert len(server.requests) == 10
        with judge_for(server, cache_path=cache) as judge:  # a resumed run: nothing is asked again
            assert judge.judge(items, completions) == first
            assert (judge.last_stats.cache_hits, judge.last_stats.requests) == (10, 0)
        with judge_for(server, cache_path=cache, model="another-judge") as judge:
            judge.judge(items, completions)
            assert (judge.last_stats.cache_hits, judge.last_stats.requests) == (0, 10)
        template = tmp_path / "strategy.txt"
        template.write_text("Type: $level\nQuestion: $question\nAnswer: $answer\nReply <score>N</score>.")
        with judge_for(server, cache_path=cache, strategy_prompt=str(template)) as judge:
            assert judge.judge(items, completions) == first
            assert (judge.last_stats.cache_hits, judge.last_stats.requests) == (5, 5)  # factual prompts cached
        assert sum("Type: ambiguous" in r.text for r in server.requests) == 5


def test_unscorable_verdicts_are_not_cached(image: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "judge.sqlite")
    with StubServer(lambda r: "no idea") as server:
        for _ in range(2):
            with judge_for(server, cache_path=cache) as judge:
                assert judge.judge(items_for(image, 1), ["s1-PASS"]) == [None]
                assert judge.last_stats.cache_hits == 0
    assert len(server.requests) == 8  # 2 runs x 2 prompts x 2 asks


def test_counters_accumulate_over_batches(image: Path) -> None:
    with StubServer(scripted) as server, judge_for(server) as judge:
        judge.judge(items_for(image, 2), ["s1-PASS", "s2-PASS"])
        judge.judge(items_for(image, 3), ["s3-PASS", "s4-PASS", "s4-FAIL"])
        # metrics() covers every batch since its previous call (a training step's and an evaluation's alike)
        assert judge.metrics()["judge/completions"] == 5 and judge.last_stats.requests == 6
        assert judge.metrics()["judge/requests"] == 0
        judge.judge(items_for(image, 1), ["s1-FAIL"])
        assert judge.metrics()["judge/requests"] == 2
    assert judge.total_stats.completions == 6 and judge.total_stats.requests == 12


def test_bad_items_name_the_problem(image: Path) -> None:
    with StubServer(scripted) as server, judge_for(server) as judge:
        with pytest.raises(ValueError, match="item 1: level must be 'ambig' or 'unambig', got 'vague'"):
            judge.judge([items_for(image, 1)[0], {**items_for(image, 1)[0], "level": "vague"}], ["a", "b"])
        with pytest.raises(ValueError, match="item 0: cannot read its image.*missing.png"):
            judge.judge([{**items_for(image, 1)[0], "image": str(image.parent / "missing.png")}], ["a"])
        with pytest.raises(ValueError, match=r"item 0 lacks \['image'\]"):
            judge.judge([{"question": "q", "level": "ambig"}], ["a"])
        with pytest.raises(ValueError, match="2 items for 1 completions"):
            judge.judge(items_for(image, 2), ["a"])
    assert server.requests == []


def test_stub_server_stops_by_itself() -> None:
    server = StubServer(lifetime_s=0.2).start()
    assert server.wait(timeout_s=5.0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(server.url.split(":")[2].split("/")[0])), timeout=1.0)
