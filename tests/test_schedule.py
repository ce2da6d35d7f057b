"""The learning-rate schedule, by hand: warm-up, then linear, cosine or constant, to a floor."""

import pytest

from grpo_fast.schedule import lr_factor


def test_warm_up_then_linear_or_cosine_decay_to_zero():
    # warm-up 3 of 8 updates: 1/4, 2/4, 3/4, then the peak, and a decay over the remaining 5
    linear = [lr_factor(u, total=8, warmup=3) for u in range(10)]
    assert linear == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    cosine = [lr_factor(u, total=8, warmup=3, kind="cosine") for u in (3, 5, 8)]
    assert cosine == pytest.approx([1.0, 0.5 * (1 + 0.309017), 0.0], abs=1e-6)  # cos(2 pi / 5) = 0.309
    assert [lr_factor(u, total=8, warmup=3, kind="constant") for u in (2, 3, 7)] == [0.75, 1.0, 1.0]


def test_sft_warm_up_peaks_on_its_last_step_and_the_cosine_ends_at_the_floor():
    # SFT: warm-up (u + 1) / warmup, cosine from the peak at update `warmup` down to 10% at the last update
    sft = [lr_factor(u, total=6, warmup=2, kind="cosine", floor=0.1, peak_in_warmup=True) for u in range(6)]
    assert sft[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert sft[4] == pytest.approx(0.1 + 0.9 * 0.5) and sft[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 - 0.7071068))
    assert lr_factor(6, total=6, warmup=2, kind="cosine", floor=0.1) == pytest.approx(0.1)
