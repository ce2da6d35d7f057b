"""scripts/demo_run.py's table on made-up results (the runs themselves take 10+ minutes per seed)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts/demo_run.py"
spec = importlib.util.spec_from_file_location("demo_run", SCRIPT)
demo_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_run)

MACHINE = {"cpu": "Test CPU @ 2.0GHz", "cores": 2, "torch": "2.13.0"}


def result(seed: int, before: float, after: float, ambig: float, unambig: float, factual: tuple, minutes: float):
    keys = demo_run.KEYS
    return {
        "seed": seed,
        "wall_seconds": minutes * 60,
        "before": dict(zip(keys, (before, 0.0, 1.0, factual[0]))),
        "after": dict(zip(keys, (after, ambig, unambig, factual[1]))),
    }


def test_the_table_has_a_row_per_seed_then_mean_and_minimum(tmp_path):
    results = [
        result(0, 0.40, 0.62, 0.70, 0.90, (0.60, 0.58), 10.0),  # clears the bar
        result(1, 0.40, 0.50, 0.50, 0.90, (0.60, 0.40), 12.0),  # lift 0.10, ambig 0.5, facts 0.2 worse
        {"seed": 2, "wall_seconds": 30.0, "error": "exit code 1"},
    ]
    table = demo_run.summarize(results, MACHINE, parallel=1)
    assert table["mean"]["lift"] == pytest.approx(0.16) and table["min"]["lift"] == pytest.approx(0.10)
    assert table["min"]["wall_seconds"] == 720.0  # the longest run
    assert table["seeds_meeting_bar"] == [0] and not table["mean_lift_meets_bar"]  # mean lift 0.16 < 0.20
    text = demo_run.write_table(table, tmp_path)
    lines = text.splitlines()
    assert lines[0] == "| seed | before | after | lift | ambig | unambig | factual | wall |"
    assert lines[2] == "| 0 | 0.400 | 0.620 | +0.220 | 0.70 | 0.90 | 0.60 → 0.58 | 10.0 min |"
    assert lines[4] == "| mean | 0.400 | 0.560 | +0.160 | 0.60 | 0.90 | 0.60 → 0.49 | 11.0 min |"
    assert lines[5] == "| min | 0.400 | 0.500 | +0.100 | 0.50 | 0.90 | 0.60 → 0.40 | 12.0 min (max) |"
    assert "Test CPU @ 2.0GHz (2 cores), torch 2.13.0; seeds run one after the other." in text
    assert "Met by 1 of 2 seeds; the mean lift misses it." in text and "Seed 2 failed: exit code 1." in text
    assert (tmp_path / "demo_table.md").read_text() == text + "\n"
    saved = json.loads((tmp_path / "demo_result.json").read_text())
    assert saved["rows"][1]["lift"] == pytest.approx(0.10) and saved["failed"] == [{"seed": 2, "error": "exit code 1"}]


def test_parallel_runs_say_their_wall_times_are_not_comparable():
    table = demo_run.summarize([result(3, 0.4, 0.6, 0.7, 0.9, (0.6, 0.6), 14.0)], MACHINE, parallel=2)
    assert "2 at a time, one torch thread each (wall times are not those of a run alone)" in demo_run.markdown(table)
    assert table["parallel"] == 2 and table["seeds_meeting_bar"] == [3]


def test_the_machine_is_named():
    info = demo_run.machine()
    assert info["cpu"] and info["cores"] >= 1 and info["torch"].split(".")[0].isdigit()
