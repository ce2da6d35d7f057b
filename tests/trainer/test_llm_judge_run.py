"""A 2-step training run with `--judge llm` against the local OpenAI-compatible stub server."""

import json

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
