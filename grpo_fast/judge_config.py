"""The LLM judge's settings: a stdlib-only dataclass, so `grpo_fast.config` can hold it without importing openai.

`grpo_fast.rewards.llm_judge` (which uses it) re-exports it; the trainer exposes each field as `--judge-<field>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

JudgeApi = Literal["chat", "responses"]


@dataclass
class LLMJudgeConfig:
    """Where and how to ask the judge. The trainer exposes each field as `--judge-<field>` (kebab case)."""

    model: str = field(default="", metadata={"help": "the judge model's name as the endpoint knows it; required"})
    base_url: str | None = field(
        default=None, metadata={"help": "endpoint, e.g. http://localhost:8000/v1; None: OpenAI (or $OPENAI_BASE_URL)"}
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "environment variable holding the API key (any value for servers that ignore it)"},
    )
    api: JudgeApi = field(default="chat", metadata={"help": "chat (Chat Completions) or responses (the Responses API)"})
    max_in_flight: int = field(default=32, metadata={"help": "requests open at once"})
    timeout_s: float = field(default=60.0, metadata={"help": "seconds one request may take"})
    max_retries: int = field(default=5, metadata={"help": "re-sends of one request after transient errors"})
    backoff_base_s: float = field(
        default=0.5, metadata={"help": "first backoff in seconds; doubles per retry, with jitter"}
    )
    backoff_max_s: float = field(default=30.0, metadata={"help": "cap on one backoff in seconds, Retry-After included"})
    temperature: float | None = field(
        default=0.0,
        metadata={
            "help": "the judge's sampling temperature; None: not sent (for models that accept only their default)"
        },
    )
    strategy_prompt: str | None = field(
        default=None, metadata={"help": "template file overriding prompts/strategy.txt"}
    )
    factual_prompt: str | None = field(default=None, metadata={"help": "template file overriding prompts/factual.txt"})
    cache_path: str | None = field(default=None, metadata={"help": "SQLite file for verdicts; None: no cache"})

    def __post_init__(self) -> None:
        if self.api not in get_args(JudgeApi):
            raise ValueError(f"judge api must be 'chat' or 'responses', got {self.api!r}")
        for name in ("max_in_flight", "timeout_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"judge {name} must be positive, got {getattr(self, name)!r}")
        for name in ("max_retries", "backoff_base_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"judge {name} must be >= 0, got {getattr(self, name)!r}")
