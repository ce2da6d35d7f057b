"""Loader for the seed format (docs/design.md, "Data"): one JSON object per line with image, level, question, answer.

Every problem is reported as `file:line: what is wrong`. With `skip_bad_lines` bad lines are dropped and
counted in one warning instead. Extra fields (e.g. the synthetic data's `scene` and `target`) are kept.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

LEVELS = ("ambig", "unambig")
TEXT_FIELDS = ("image", "question", "answer")


class SeedFormatError(ValueError):
    """A bad line in a seed file; the message starts with `file:line:`."""


def _check(obj: Any, folder: Path) -> str | None:
    """What is wrong with one parsed line, or None; resolves `obj["image"]` to an absolute path in place."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for field in (*TEXT_FIELDS, "level"):
        if field not in obj:
            return f"missing field {field!r}"
    for field in TEXT_FIELDS:
        if not isinstance(obj[field], str) or not obj[field].strip():
            return f"field {field!r} must be a non-empty string, got {obj[field]!r}"
    if obj["level"] not in LEVELS:
        return f"field 'level' must be 'ambig' or 'unambig', got {obj['level']!r}"
    image = folder / obj["image"]
    if not image.is_file():
        return f"image not found: {image} (paths are relative to the jsonl file's folder)"
    try:
        with Image.open(image) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for missing, truncated or foreign files
        return f"image unreadable: {image} ({e})"
    obj["image"] = str(image.resolve())
    return None


def load_seed(path: Path | str, *, skip_bad_lines: bool = False) -> list[dict[str, Any]]:
    """Items of a seed jsonl file, image paths made absolute. Raises SeedFormatError on the first bad line.

    Blank lines are ignored. With `skip_bad_lines`, bad lines are skipped with one warning that counts them.
    An empty result is an error either way.
    """
    path = Path(path)
    if not path.is_file():
        raise SeedFormatError(f"{path}: no such file")
    items, bad = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"bad JSON ({e.msg} at column {e.colno})"
            else:
                problem = _check(obj, path.parent)
            if problem is None:
                items.append(obj)
            elif skip_bad_lines:
                bad.append(f"{path}:{lineno}: {problem}")
            else:
                raise SeedFormatError(f"{path}:{lineno}: {problem}")
    if bad:
        warnings.warn(f"skipped {len(bad)} bad line(s); first: {bad[0]}", stacklevel=2)
    if not items:
        raise SeedFormatError(f"{path}: no usable items")
    return items
