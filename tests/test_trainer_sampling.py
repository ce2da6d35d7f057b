"""The rollout sampler: per-row seeded draws after temperature / top-k / top-p, as a logits processor for generate."""

import torch

from grpo_fast.trainer_sampling import SeededSampler, row_seed


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
