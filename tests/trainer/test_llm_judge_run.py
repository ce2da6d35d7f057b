"""Training runs with `--judge llm` against the local OpenAI-compatible stub server: 2 plain steps, 50 steps under
injected faults, a server restart mid-run, and a judge that is down."""

import dataclasses
import itertools
import json
import socket
import threading
import time

import pytest

from grpo_fast.rewards.stub_server import FAULT_NAMES, Faults, StubReply, StubServer, hash_reply
from grpo_fast.train import main


def test_two_steps_with_the_llm_judge(tmp_path, synthetic_data, tiny_run_flags, stub_judge):
    sent_before = len(stub_judge.server.requests)
    cache = ["--judge-cache-path", str(tmp_path / "judge.sqlite")]
    folders = ["--data", str(synthetic_data), "--output-dir", str(tmp_path / "runs")]
    short = ["--warm-start", "false", "--max-steps", "2", "--max-completion-length", "6", "--eval-items", "2"]
    main([*tiny_run_flags, *stub_judge.flags, *cache, *folders, *short])
    requests = stub_judge.server.requests[sent_before:]
    records = [json.loads(line) for line in (tmp_path / "runs/grpo-tiny/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # the judge's own counters are logged with each step: 8 completions, a strategy and a factual request at least
    assert all(r["judge/completions"] == 8 and r["judge/requests"] >= 2 for r in steps)
    assert requests and all(r["model"] == "stub" for r in (q.body for q in requests))
    assert any(q.image_urls for q in requests) and any(not q.image_urls for q in requests)
    # the stub's hashed scores give rewards that vary within groups: the judge's verdicts reached the loss
    assert any(r["reward_std"] > 0 for r in steps)
    assert [r["step"] for r in records if "eval/reward" in r] == [0, 2]
    assert (tmp_path / "judge.sqlite").is_file()  # verdicts cached for a repeated run


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _summed(records, key):
    """A judge counter over the whole run: each record carries the counts since the previous one."""
    return sum(r.get(f"judge/{key}", 0) for r in records)


# 2 prompts x G=2 completions of at most 4 tokens, 2 eval items; short judge timeouts and backoffs
SHORT_RUN = ("--batch-size", "4", "--num-generations", "2", "--max-completion-length", "4", "--eval-items", "2")
SHORT_RUN += ("--warm-start", "false", "--beta", "0", "--learning-rate", "1e-3")
QUICK_RETRIES = ("--judge-backoff-base-s", "0.005", "--judge-backoff-max-s", "0.05", "--judge-max-retries", "8")


def test_fifty_steps_against_a_faulty_judge(tmp_path, synthetic_data, stub_judge):
    """20% 5xx, 10% 429 with Retry-After, 5% timeouts, 5% garbage (3% replies without a score or verdict, 2% bodies
    that are not JSON), 5% dropped connections: the run finishes, every completion is scored or counted unscorable,
    and the judge/* metrics agree with the server's own counts."""
    faults = Faults(server_error=0.2, rate_limit=0.1, timeout=0.05, garbage=0.03, malformed=0.02, dropped=0.05)
    faults = dataclasses.replace(faults, retry_after_s=0.02, hang_s=5.0, seed=0)
    folders = ["--data", str(synthetic_data), "--output-dir", str(tmp_path / "runs"), "--name", "faulty"]
    with StubServer(hash_reply, faults=faults) as server:
        # a 2 s client timeout, still well under the 5 s hang: at 0.5 s a garbage reply delayed on a loaded machine
        # was once timed out and retried instead of counted (unparsed 27 of the server's 28 garbage replies)
        judge = [*stub_judge.flags, "--judge-base-url", server.url, *QUICK_RETRIES, "--judge-timeout-s", "2"]
        main([*SHORT_RUN, *judge, *folders, "--max-steps", "50"])
    run = tmp_path / "runs/faulty"
    records = _records(run)
    steps = [r for r in records if "frac_unscorable" in r]
    assert [r["step"] for r in steps] == list(range(1, 51)) and (run / "final").is_dir()
    for r in steps:  # 4 completions a step, each scored or unscorable
        assert r["judge/completions"] == 4 and r["judge/unscorable"] == round(4 * r["frac_unscorable"]), r
    assert [r["step"] for r in records if "eval/reward" in r] == [0, 50]
    assert all(r["judge/completions"] == 2 for r in records if "eval/reward" in r)  # evaluations are counted too
    # the server received what the judge sent; every fault but garbage cost a retry (or, after 8, a failure)
    assert _summed(records, "requests") == len(server.requests) == sum(server.counts.values())
    assert all(server.counts[name] > 0 for name in FAULT_NAMES)
    assert _summed(records, "unparsed") == server.counts["garbage"]
    transient = sum(server.counts[name] for name in FAULT_NAMES if name != "garbage")
    assert _summed(records, "retries") + _summed(records, "failures") == transient


def test_a_judge_server_restart_costs_only_retries(tmp_path, synthetic_data, stub_judge):
    """The server goes down in the middle of step 3's batch (its open connections closed) and comes back on the
    same port 0.3 s later: no request fails for good, no completion goes unscorable, the run ends normally."""
    servers: list[StubServer] = []
    arrivals = itertools.count(1)

    def reply(request):
        if next(arrivals) == 4 + 2 * 8 + 3:  # the eval's 4 requests, steps 1-2's 8 each, 3 of step 3's
            threading.Thread(target=restart, daemon=True).start()
            return StubReply(delay_s=10.0)  # cut short by the stop: its connection closes unanswered
        return hash_reply(request)

    def restart():
        servers[0].stop()
        time.sleep(0.3)
        servers.append(StubServer(hash_reply, port=servers[0].port).start())

    servers.append(StubServer(reply).start())
    folders = ["--data", str(synthetic_data), "--output-dir", str(tmp_path / "runs"), "--name", "restart"]
    judge = [*stub_judge.flags, "--judge-base-url", servers[0].url, "--judge-backoff-base-s", "0.02"]
    judge += ["--judge-backoff-max-s", "0.2", "--judge-max-retries", "10"]
    try:
        main([*SHORT_RUN, *judge, *folders, "--max-steps", "5"])
    finally:
        for server in servers:
            server.stop()
    records = _records(tmp_path / "runs/restart")
    assert [r["step"] for r in records if "frac_unscorable" in r] == [1, 2, 3, 4, 5]
    assert len(servers) == 2 and len(servers[1].requests) > 0
    assert _summed(records, "retries") > 0 and _summed(records, "failures") == 0
    assert _summed(records, "unscorable") == 0 and all(
        r["frac_unscorable"] == 0 for r in records if "frac_unscorable" in r
    )
    # requests refused while the server was down reached neither server
    assert _summed(records, "requests") >= len(servers[0].requests) + len(servers[1].requests)


def test_a_judge_that_is_down_stops_the_run_with_one_line(tmp_path, synthetic_data, stub_judge, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    folders = ["--data", str(synthetic_data), "--output-dir", str(tmp_path / "runs"), "--name", "down"]
    judge = [*stub_judge.flags, "--judge-base-url", down, *QUICK_RETRIES]
    with pytest.raises(SystemExit) as stopped:
        main([*SHORT_RUN, *judge, *folders, "--max-steps", "2"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert stopped.value.code == 2 and len(errors) == 1
    assert errors[0].startswith("error: all ") and "judge requests failed after 8 retries" in errors[0]
    assert down in errors[0]  # "is http://127.0.0.1:<port>/v1 reachable?"
