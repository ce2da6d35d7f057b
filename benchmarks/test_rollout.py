"""Completion tokens per second of a rollout: the trainer's path against plain HF `generate`, on the same prompts.

The tiny default (what `benchmarks/test_step.py` trains): the built-in tiny InternVL (random init, seed 0, fp32,
CPU), 8 synthetic prompts x G = 4 = 32 completions, at most 40 new tokens, temperature 0.7, top_p 1, top_k 0.
Three rows, timed side by side in one process, interleaved (each round runs the three once), at 1 torch thread
and at every core:
- `hf_generate`: what a user writes, `model.generate(**inputs, do_sample=True, temperature=0.7,
  max_new_tokens=40)` on HF's layout (every row its own copy of its image, generate's own prefill of all 32 rows,
  its DynamicCache and sampler, which adds transformers' default top_k = 50 where the rollout keeps top_k 0);
- `hf_seeded`: the rollout before `StaticDecoder`: HF generate with `SeededSampler` as a logits processor, each
  image encoded once and each group's prompt prefilled once;
- `rollout`: `generate_completions` as the trainer calls it (the group prefill, then `StaticDecoder`'s loop).
Tokens are completion tokens up to and including EOS (what the trainer keeps), so a row that ends early counts
less. The pytest-benchmark table times the `rollout` row (its setup runs the two others, by hand); every row's
median tokens/s over the rounds and the ratios are printed and kept in `extra_info`. The target, `rollout` at least MIN_SPEEDUP x
`hf_generate`'s tokens/s, is asserted at both thread counts.

    pytest benchmarks/test_rollout.py --benchmark-only
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from grpo_fast.threads import usable_cores

PROMPTS, G, MAX_NEW_TOKENS, TEMPERATURE = 8, 4, 40, 0.7
ROUNDS = int(os.environ.get("GRPO_FAST_BENCH_ROUNDS", "10"))
MIN_SPEEDUP = 2.0


def _tokens(ids: torch.Tensor, eos_id: int) -> int:
    """Completion tokens of `ids [B, C]`: each row's up to and including its first EOS (C without one)."""
    is_eos = ids == eos_id
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ids.shape[1])
    return int(ends.sum())


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, say) -> dict[str, Callable[[], int]]:
    """Each row as a function that generates the 32 completions and returns their token count."""
    from grpo_fast.data import load_seed
    from grpo_fast.data.synthetic import write_dataset
    from grpo_fast.models import load_policy
    from grpo_fast.models.generation import SeededSampler, _hf_generate, generate_completions
    from grpo_fast.models.inputs import collate
    from grpo_fast.trainer.rollout import row_seed

    folder: Path = tmp_path_factory.mktemp("rollout")
    write_dataset(folder, 24, seed=0)
    items = load_seed(folder / "train.jsonl")[:PROMPTS]
    policy = load_policy("tiny", seed=0)
    model, tok = policy.model.eval(), policy.tokenizer
    groups = collate(policy, items, repeats=G)  # the trainer's batch
    inputs = collate(policy, [it for it in items for _ in range(G)]).prompt_inputs()  # HF's layout
    calls = iter(range(1_000_000))  # fresh seeds every call, as the trainer's steps

    def sampler() -> SeededSampler:
        step = next(calls)
        return SeededSampler([row_seed(0, step, i) for i in range(PROMPTS * G)], TEMPERATURE, 0, 1.0)

    def hf_generate() -> int:
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS)
        return _tokens(out[:, inputs["input_ids"].shape[1] :], tok.eos_token_id)

    def hf_seeded() -> int:
        with torch.no_grad():
            return _tokens(_hf_generate(model, groups, tok, MAX_NEW_TOKENS, sampler(), False), tok.eos_token_id)

    def rollout() -> int:
        out = generate_completions(model, groups, tok, max_new_tokens=MAX_NEW_TOKENS, logits_processor=sampler())
        return int(out.mask.sum())

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    say(
        f"\ntiny InternVL, {PROMPTS} prompts x G={G}, <= {MAX_NEW_TOKENS} new tokens, temperature {TEMPERATURE}; "
        f"prompt width {groups.prompt_ids.shape[1]}; load average (1, 5, 15 min): {load}"
    )
    return {"hf_generate": hf_generate, "hf_seeded": hf_seeded, "rollout": rollout}


@pytest.mark.parametrize("threads", sorted({1, usable_cores()}))
def test_rollout_tokens_per_second(benchmark, say, rows: dict[str, Callable[[], int]], threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    tokens: dict[str, list[int]] = {name: [] for name in rows}

    def timed(name: str) -> None:
        start = time.perf_counter()
        count = rows[name]()
        seconds[name].append(time.perf_counter() - start)
        tokens[name].append(count)

    def baselines() -> None:
        timed("hf_generate")
        timed("hf_seeded")

    def rollout() -> None:
        timed("rollout")

    try:
        for run in rows.values():  # warm-up
            run()
        benchmark.group = (
            f"rollout, tiny InternVL, {PROMPTS * G} completions x {MAX_NEW_TOKENS} tokens, {threads} thread(s)"
        )
        benchmark.pedantic(rollout, setup=baselines, rounds=ROUNDS, iterations=1)
    finally:
        torch.set_num_threads(before)
    # tokens/s: the median over the rounds (a round the machine stalls on skews a sum)
    rate = {name: statistics.median(n / s for n, s in zip(tokens[name], seconds[name])) for name in rows}
    median_s = {name: statistics.median(seconds[name]) for name in rows}
    speedup = rate["rollout"] / rate["hf_generate"]
    for name in rows:
        say(
            f"{threads} thread(s), {name:11s}: {rate[name]:7.0f} completion tokens/s, median {median_s[name]:.3f} s "
            f"per {PROMPTS * G} completions ({statistics.mean(tokens[name]):.0f} tokens)"
        )
    say(
        f"{threads} thread(s): rollout is {speedup:.2f}x hf_generate, {rate['rollout'] / rate['hf_seeded']:.2f}x "
        f"hf_seeded in tokens/s (target {MIN_SPEEDUP}x hf_generate)"
    )
    benchmark.extra_info.update(
        threads=threads,
        tokens_per_s={name: round(r) for name, r in rate.items()},
        median_s={name: round(s, 4) for name, s in median_s.items()},
        speedup_vs_hf_generate=round(speedup, 2),
        speedup_vs_hf_seeded=round(rate["rollout"] / rate["hf_seeded"], 2),
        load_average=os.getloadavg()[0],
    )
    assert speedup >= MIN_SPEEDUP, f"rollout {speedup:.2f}x hf_generate at {threads} thread(s), target {MIN_SPEEDUP}x"
