"""The train/val loader: both splits with absolute image paths, a missing split named with the fix."""

import json
import shutil
from pathlib import Path

import pytest

from grpo_fast.config import ConfigError
from grpo_fast.data.seed import SeedFormatError
from grpo_fast.data.splits import load_splits


def test_both_splits_load_with_absolute_images(synthetic_data):
    train, val = load_splits(synthetic_data)
    assert (len(train), len(val)) == (36, 4)
    assert all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in train + val)
    assert {it["level"] for it in val} == {"ambig", "unambig"}


def test_a_missing_split_is_an_error_unless_val_is_optional(tmp_path, synthetic_data):
    shutil.copytree(synthetic_data, tmp_path / "data")
    (tmp_path / "data/val.jsonl").unlink()
    with pytest.raises(ConfigError, match="has no val.jsonl \\(it needs train.jsonl and val.jsonl\\)"):
        load_splits(tmp_path / "data")
    train, val = load_splits(tmp_path / "data", val_required=False)
    assert len(train) == 36 and val == []
    with pytest.raises(ConfigError, match="has no train.jsonl \\(it needs train.jsonl\\)"):
        load_splits(tmp_path, val_required=False)


def test_bad_lines_fail_or_are_skipped(tmp_path, synthetic_data):
    shutil.copytree(synthetic_data, tmp_path / "data")
    train_file = tmp_path / "data/train.jsonl"
    lines = train_file.read_text().splitlines()
    train_file.write_text("\n".join([lines[0], json.dumps({"image": "x.png"}), *lines[1:]]) + "\n")
    with pytest.raises(SeedFormatError, match="train.jsonl:2: missing field"):
        load_splits(tmp_path / "data")
    with pytest.warns(UserWarning, match="skipped 1 bad line"):
        train, _ = load_splits(tmp_path / "data", skip_bad_lines=True)
    assert len(train) == 36
