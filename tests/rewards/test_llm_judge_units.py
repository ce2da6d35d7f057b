"""LLM judge pieces without a server: reply parsing, prompt templates, config checks, Retry-After, backoff."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import pytest
from PIL import Image

from grpo_fast import judge_config
from grpo_fast.rewards import LLMJudge, LLMJudgeConfig
from grpo_fast.rewards.llm_judge import (
    backoff_s,
    error_message,
    image_data_url,
    load_template,
    parse_score,
    parse_verdict,
    retry_after_s,
)


@pytest.mark.parametrize(
    "reply, score",
    [
        ("<score>4</score>", 4),
        ("The answer asks which man is meant.\n<score> 3 </score>", 3),
        ("First guess <score>2</score>, on reflection <SCORE>1</SCORE>", 1),  # the last tag is the verdict
        ("<score>0</score>", None),
        ("<score>5</score>", None),
        ("<score>12</score>", None),
        ("Score: 4", None),  # no tag: a naive parser would pick up the digit, or default to 1
        ("", None),
        ("<score>four</score>", None),
        ("<score>3</score> ... <score>4 or 5</score>", None),  # the last tag decides, and it is not a score
    ],
)
def test_parse_score(reply: str, score: int | None) -> None:
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("<verdict>PASS</verdict>", True),
        ("Nothing invented. <verdict> fail </verdict>", False),
        ("It says FAIL at first... <verdict>PASS</verdict>", True),  # a tag beats bare words
        ("PASS", True),
        ("FAIL: there is no dog in the image.", False),
        ("PASS, though a strict grader might FAIL it", None),  # both words and no tag
        ("pass", None),  # bare words count only in capitals, as the prompt asks
        ("<verdict>MAYBE</verdict>", None),
        ("It does not PASS. <verdict>unsure</verdict>", None),  # a tag, even a bad one, beats bare words
        ("COMPASS", None),
        ("", None),
    ],
)
def test_parse_verdict(reply: str, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


def test_default_templates_ship_with_the_package() -> None:
    strategy, factual = load_template("strategy"), load_template("factual")
    text = strategy.substitute(level="ambiguous", question="Which cup?", answer="The blue one.")
    assert "Data type: ambiguous" in text and "Which cup?" in text and "<score>" in text
    assert "<verdict>PASS</verdict>" in factual.substitute(question="q", answer="a")


@pytest.mark.parametrize(
    "kind, text, error",
    [
        ("strategy", "Question: $question Answer: $answer", r"missing placeholders \['level'\]"),
        ("factual", "Question: $question", r"missing placeholders \['answer'\]"),
        ("factual", "$question $answer $image", r"unknown placeholders \['image'\]"),
        ("factual", "$question $answer costs $5", "write '\\$\\$' for a literal dollar sign"),
    ],
)
def test_bad_templates_are_refused(tmp_path: Path, kind: str, text: str, error: str) -> None:
    path = tmp_path / "prompt.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=error) as raised:
        load_template(kind, str(path))
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"api": "soap"}, "api must be 'chat' or 'responses', got 'soap'"),
        ({"max_in_flight": 0}, "max_in_flight must be positive, got 0"),
        ({"timeout_s": -1.0}, "timeout_s must be positive"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
    ],
)
def test_bad_config_values_are_refused(overrides: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        LLMJudgeConfig(model="m", **overrides)


def test_a_judge_needs_a_model_and_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.raises(ValueError, match="--judge-model"):
        LLMJudge(LLMJudgeConfig())
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$MY_JUDGE_KEY, which is unset"):
        LLMJudge(LLMJudgeConfig(model="m", api_key_env="MY_JUDGE_KEY"))


def test_image_data_url(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 3), (0, 255, 0))
    image.save(tmp_path / "a.jpg")
    url, digest = image_data_url(tmp_path / "a.jpg")
    assert url.startswith("data:image/jpeg;base64,") and len(digest) == 64
    png_url, png_digest = image_data_url(image)
    assert png_url.startswith("data:image/png;base64,") and png_digest != digest
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image file extension"):
        image_data_url(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"error": {"message": "model not found", "type": "invalid_request_error"}}', "model not found"),
        (b'{"detail": "Not Found"}', '{"detail": "Not Found"}'),  # no error.message: the body as it came
        (b'["a", "list"]', '["a", "list"]'),
        (b"  <html>502 Bad Gateway</html>\n", "<html>502 Bad Gateway</html>"),
        (b"\xff\xfe not UTF-8", "\ufffd\ufffd not UTF-8"),
        (b"x" * 500, "x" * 300),
    ],
)
def test_error_message(body: bytes, message: str) -> None:
    assert error_message(body) == message


def test_retry_after_forms() -> None:
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "0.25"}) == 0.25
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5  # milliseconds win
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_s({"retry-after": date}) <= 31
    assert retry_after_s({"retry-after": email.utils.formatdate(time.time() - 60, usegmt=True)}) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    for retry, full in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 8.0)]:  # base 0.5 doubles per retry, capped at 8
        delays = [backoff_s(retry, 0.5, 8.0) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 10  # jittered, not fixed


def test_the_judge_settings_are_one_leaf_class() -> None:
    assert LLMJudgeConfig is judge_config.LLMJudgeConfig
