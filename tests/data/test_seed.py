"""The seed-format loader: every bad line is named with file and line; --skip-bad-lines counts them."""

import json
from pathlib import Path

import pytest
from PIL import Image

from grpo_fast.data import SeedFormatError, load_seed

DATASET = Path(__file__).resolve().parents[2] / "dataset"
GOOD = {"image": "a.png", "level": "ambig", "question": "What colour is the circle?", "answer": "Which circle?"}


def _write(folder: Path, lines: list[str]) -> Path:
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"not a png")
    path = folder / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "bad JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "question"}), "missing field 'question'"),
        (json.dumps(GOOD | {"answer": 3}), "field 'answer' must be a non-empty string"),
        (json.dumps(GOOD | {"question": "  "}), "field 'question' must be a non-empty string"),
        (json.dumps(GOOD | {"level": "easy"}), "field 'level' must be 'ambig' or 'unambig', got 'easy'"),
        (json.dumps(GOOD | {"image": "missing.png"}), "image not found"),
        (json.dumps(GOOD | {"image": "broken.png"}), "image unreadable"),
    ],
)
def test_bad_line_is_named_with_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [json.dumps(GOOD), "", bad])
    with pytest.raises(SeedFormatError, match=rf"d\.jsonl:3: .*{message}"):
        load_seed(path)


def test_skip_bad_lines_counts_them_in_one_warning(tmp_path):
    path = _write(tmp_path, [json.dumps(GOOD), "{oops", json.dumps(GOOD | {"level": "x"}), json.dumps(GOOD)])
    with pytest.warns(UserWarning, match=r"skipped 2 bad line\(s\); first: .*d\.jsonl:2: bad JSON"):
        items = load_seed(path, skip_bad_lines=True)
    assert len(items) == 2
    assert items[0]["image"] == str((tmp_path / "a.png").resolve())


def test_empty_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(SeedFormatError, match="no usable items"):
        load_seed(_write(tmp_path, [""]))
    with pytest.raises(SeedFormatError, match="no such file"):
        load_seed(tmp_path / "nope.jsonl")


def test_shipped_samples_load_with_ground_truth():
    items = load_seed(DATASET / "sample.jsonl")
    assert {it["level"] for it in items} == {"ambig", "unambig"}
    assert all("scene" in it and "target" in it for it in items)
