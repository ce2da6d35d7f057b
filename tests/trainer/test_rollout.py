"""The rollout sampler: per-row seeded draws after temperature / top-k / top-p, as a logits processor for generate;
samples.jsonl records of a rollout."""

import math

import torch

from grpo_fast.models.generation import SeededSampler
from grpo_fast.models.inputs import Batch
from grpo_fast.trainer.rollout import Rollout, row_seed, sample_records


def _draw(sampler, logits, n):
    """Token ids of n successive calls (each returns 0 at the pick and -inf elsewhere)."""
    picks = []
    for _ in range(n):
        out = sampler(None, logits)
        assert ((out == 0) | (out == -float("inf"))).all() and ((out == 0).sum(1) == 1).all()
        picks.append(out.argmax(1))
    return torch.stack(picks, 1)  # [rows, n]


def test_rows_follow_their_own_seed_and_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7, 0.0]])).repeat(2, 1)  # token 3 has probability 0
    seeds = [row_seed(0, 0, 0), row_seed(0, 0, 1)]
    a = _draw(SeededSampler(seeds, 1.0, 0, 1.0), logits, 3000)
    b = _draw(SeededSampler(seeds[:1], 1.0, 0, 1.0), logits[:1], 3000)
    assert torch.equal(a[0], b[0])  # a row's draws do not depend on the other rows
    assert not torch.equal(a[0], a[1])
    freq = torch.bincount(a.flatten(), minlength=4).float() / a.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.7, 0.0]), atol=0.02, rtol=0)


def test_temperature_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    draw = lambda **kw: torch.bincount(_draw(SeededSampler([7], **kw), logits, 2000).flatten(), minlength=4) / 2000
    assert draw(temperature=1.0, top_k=1, top_p=1.0).tolist() == [0, 0, 0, 1]  # greedy
    assert draw(temperature=1.0, top_k=0, top_p=0.3).tolist() == [0, 0, 0, 1]  # 0.4 alone reaches 0.3
    kept = draw(temperature=1.0, top_k=2, top_p=1.0)
    assert kept[:2].sum() == 0 and abs(kept[3] - 0.4 / 0.7) < 0.03  # renormalised over the top 2
    cold = draw(temperature=0.5, top_k=0, top_p=1.0)  # p^2 normalised: 0.4^2 / 0.3 = 0.53
    assert abs(cold[3] - 0.16 / 0.30) < 0.03


def test_row_seeds_are_63_bit_and_depend_on_seed_step_and_row():
    seeds = {row_seed(s, t, r) for s in range(2) for t in range(2) for r in range(2)}
    assert len(seeds) == 8 and all(0 <= x < 2**63 for x in seeds)
    assert row_seed(0, 1, 2) == row_seed(0, 1, 2)


def test_sample_records_hold_the_first_completions_with_none_for_unscorable():
    items = [{"question": f"q{i}", "level": "ambig", "image": f"{i}.png", "scene": {}} for i in range(3)]
    ids = torch.zeros(3, 1, dtype=torch.long)
    rollout = Rollout(
        items=items,
        batch=Batch(prompt_ids=ids, prompt_mask=ids, pixel_values=torch.zeros(1)),
        texts=["a", "b", "c"],
        rewards=torch.tensor([[1.0, math.nan], [0.5, 0.0], [0.0, 0.0]]),
        advantages=torch.tensor([0.5, -0.5, 0.0]),
        old_logp=None,
        ref_logp=None,
        truncated=torch.zeros(3, dtype=torch.bool),
        lengths=torch.ones(3, dtype=torch.long),
    )
    records = sample_records(rollout, step=7, count=2)
    assert records == [
        {
            "step": 7,
            "question": "q0",
            "level": "ambig",
            "image": "0.png",
            "completion": "a",
            "rewards": [1.0, None],
            "advantage": 0.5,
        },
        {
            "step": 7,
            "question": "q1",
            "level": "ambig",
            "image": "1.png",
            "completion": "b",
            "rewards": [0.5, 0.0],
            "advantage": -0.5,
        },
    ]
