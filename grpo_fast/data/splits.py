"""The loaders of a data folder (`train.jsonl`, `val.jsonl`, any other `<split>.jsonl`, images beside them): train/val
for GRPO and SFT, one split by name for `python -m grpo_fast.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grpo_fast.config import ConfigError
from grpo_fast.data.seed import load_seed


def load_splits(
    folder: Path | str, *, skip_bad_lines: bool = False, val_required: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val) items of `folder`; without `val_required` a missing val.jsonl gives no val items.

    Raises ConfigError when a required split file is missing, SeedFormatError on a bad line.
    """
    folder = Path(folder)
    needed = ("train", "val") if val_required else ("train",)
    for split in needed:
        if not (folder / f"{split}.jsonl").is_file():
            raise ConfigError(
                f"data folder {folder} has no {split}.jsonl (it needs {' and '.join(s + '.jsonl' for s in needed)})"
            )
    train = load_seed(folder / "train.jsonl", skip_bad_lines=skip_bad_lines)
    val_path = folder / "val.jsonl"
    val = load_seed(val_path, skip_bad_lines=skip_bad_lines) if val_path.is_file() else []
    return train, val


def load_split(folder: Path | str, split: str, *, skip_bad_lines: bool = False) -> list[dict[str, Any]]:
    """The items of `<folder>/<split>.jsonl`. Raises ConfigError when the folder or the split is missing (naming the
    splits there are), SeedFormatError on a bad line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"data folder {folder} does not exist")
    splits = sorted(p.stem for p in folder.glob("*.jsonl") if p.is_file())
    if split not in splits:
        there = f"its splits: {', '.join(splits)}" if splits else "it holds no <split>.jsonl file"
        raise ConfigError(f"data folder {folder} has no split {split!r} ({split}.jsonl); {there}")
    return load_seed(folder / f"{split}.jsonl", skip_bad_lines=skip_bad_lines)
