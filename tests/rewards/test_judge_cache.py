"""The verdict cache: a round trip, persistence, and several processes writing one file."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from grpo_fast.rewards.judge_cache import JudgeCache, cache_key


def test_cache_round_trip(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "sub" / "judge.sqlite")
    keys = [cache_key("model", f"prompt {i}", "") for i in range(1200)]  # more keys than one query takes
    cache.put_many({key: str(i % 4 + 1) for i, key in enumerate(keys)})
    cache.put_many({keys[0]: "4"})  # a later write wins
    found = cache.get_many(keys + [cache_key("model", "never asked", "")])
    assert len(found) == 1200 and found[keys[0]] == "4" and found[keys[5]] == "2"
    assert cache_key("ab", "c") != cache_key("a", "bc")
    cache.close()


def _write_many(path: str, worker: int) -> None:
    cache = JudgeCache(path)
    for batch in range(20):  # many small transactions, interleaved with the other process's
        shared = {cache_key("shared", str(batch)): "PASS"}
        cache.put_many({cache_key(str(worker), str(batch), str(i)): str(worker) for i in range(10)} | shared)
    cache.close()


def test_cache_is_safe_to_share_between_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "judge.sqlite")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_many, args=(path, worker)) for worker in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [process.exitcode for process in workers] == [0, 0, 0]
    cache = JudgeCache(path)
    assert len(cache) == 3 * 200 + 20
    cache.close()


def test_verdicts_survive_reopening_and_an_empty_write_is_a_no_op(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "judge.sqlite")
    cache.put_many({cache_key("m", "p"): "3"})
    cache.put_many({})
    cache.close()
    reopened = JudgeCache(tmp_path / "judge.sqlite")
    assert len(reopened) == 1 and reopened.get_many([cache_key("m", "p"), cache_key("m", "q")]) == {
        cache_key("m", "p"): "3"
    }
    reopened.close()


def test_keys_tell_every_part_apart() -> None:
    key = cache_key("model", "template", "question", "answer", "image")
    assert key == cache_key("model", "template", "question", "answer", "image") and len(key) == 64
    assert key != cache_key("model", "template", "question", "answer", "other image")
    assert cache_key("a", "b") != cache_key("a", "b", "")
