"""The train/val loader of a data folder (`train.jsonl`, `val.jsonl`, images beside them), for GRPO and SFT."""

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
