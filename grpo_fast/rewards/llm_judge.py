"""The rubric applied by an LLM over any OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, Ollama, llama.cpp).

Each completion costs two requests, as the rubric has two parts (docs/design.md, "Rewards"): the strategy prompt
(data type, question, answer -> `<score>1-4</score>`; no image) and the factual prompt (question, answer and
the image as a base64 data URL -> `<verdict>PASS|FAIL</verdict>`). A batch is judged concurrently with at most
`max_in_flight` requests open while the caller waits once; identical requests in a batch are sent once.

Faults: every request has a timeout; timeouts, connection errors, 408/409/429, 5xx and 200s whose body is not
the API's JSON (a proxy's page, a cut reply) are retried with exponential backoff and jitter (429 waits what
Retry-After says); other 4xx (a wrong key, model or URL) raise `JudgeRequestError`, which stops the run rather
than train on zeros. A reply without a valid score or verdict is asked once more, then the completion is
unscorable (None -> advantage 0). A request still failing after `max_retries` makes its completion unscorable
too, but a batch whose every request failed raises `JudgeUnavailableError`: the endpoint is down, and a run must
not go on with no reward signal. Each batch with unscorable completions logs one warning.

Verdicts are cached in SQLite (`cache_path`) keyed by model, rendered prompt (template, level, question,
answer) and image hash, so a resumed or repeated run does not pay twice.

Requests: the `openai` client resolves the endpoint (`base_url`, else $OPENAI_BASE_URL, else OpenAI's), the key
and the headers it would send; each request is then built here as JSON bytes and sent on that client's httpx
client, whose transport (`judge_http.JudgeTransport`) keeps plain-HTTP connections alive on asyncio sockets.
Against a fast local endpoint the judge is bound by its own CPU per request, and the SDK's request path (typed
options, URL and header merging, per request) was a third of it once the transport was lean.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import io
import json
import logging
import mimetypes
import os
import random
import re
import ssl
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import Any, Literal, Self

import anyio
import httpx2
import openai
from PIL import Image

from grpo_fast.judge_config import JudgeApi, LLMJudgeConfig
from grpo_fast.rewards.judge import Judgment
from grpo_fast.rewards.judge_cache import JudgeCache, cache_key
from grpo_fast.rewards.judge_http import JudgeTransport

logger = logging.getLogger(__name__)

LEVEL_WORDS = {"ambig": "ambiguous", "unambig": "unambiguous"}
# Placeholders each template must use; `$level` is the data type in words ("ambiguous" / "unambiguous").
TEMPLATE_FIELDS = {"strategy": {"level", "question", "answer"}, "factual": {"question", "answer"}}
# Statuses worth retrying besides 5xx: request timeout, conflict (OpenAI's transient lock), rate limit.
RETRYABLE_STATUS = {408, 409, 429}
# What a failed connection can raise: httpx's errors, and two that its anyio transport (https://) lets through
# unmapped on a TLS failure; the openai SDK treats the same three as connection errors.
TRANSPORT_ERRORS = (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream)
ROUTES = {"chat": "chat/completions", "responses": "responses"}  # under the base URL
FATAL_HINTS = {
    400: "the endpoint rejected the request: does the model take images, and this temperature (try None)?",
    401: "the API key was rejected: check the key in {env}",
    403: "the API key may not use this model",
    404: "no such model or route: check --judge-model, and that --judge-base-url ends in /v1",
}


class JudgeRequestError(RuntimeError):
    """The endpoint refused a request for a reason retrying cannot fix (bad key, model, URL or request)."""


class JudgeUnavailableError(RuntimeError):
    """Every request of a batch failed after all retries: the endpoint is down or unreachable."""


@dataclass
class JudgeStats:
    """Counters for one batch or a whole run, logged as metrics."""

    completions: int = 0  # completions judged
    cache_hits: int = 0  # verdicts read from the cache instead of asked
    requests: int = 0  # HTTP requests sent, retries and re-asks included
    retries: int = 0  # re-sends after a timeout, connection error, 408/409/429, 5xx or malformed body
    failures: int = 0  # requests given up after max_retries
    unparsed: int = 0  # replies without a valid score or verdict (the re-asks' included)
    reasks: int = 0  # replies without a valid score or verdict, asked once more
    unscorable: int = 0  # completions judged None

    def add(self, other: JudgeStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_metrics(self, prefix: str = "judge/") -> dict[str, float]:
        return {prefix + name: float(value) for name, value in asdict(self).items()}


def parse_score(reply: str) -> int | None:
    """The strategy score in the reply's last `<score>` tag (judges reason first); None unless it holds 1-4."""
    tags = re.findall(r"<score>\s*(.*?)\s*</score>", reply, flags=re.IGNORECASE | re.DOTALL)
    return int(tags[-1]) if tags and tags[-1] in ("1", "2", "3", "4") else None


def parse_verdict(reply: str) -> bool | None:
    """True on PASS, False on FAIL: from the last `<verdict>` tag if there is one, else from a bare word.

    A tag that holds neither word gives None. Untagged replies count only when they say exactly one of PASS and
    FAIL, in capitals: "PASS, though a strict grader might FAIL it" gives None.
    """
    tags = re.findall(r"<verdict>\s*(.*?)\s*</verdict>", reply, flags=re.IGNORECASE | re.DOTALL)
    words = {tags[-1].upper()} if tags else set(re.findall(r"\b(PASS|FAIL)\b", reply))
    return {"PASS": True, "FAIL": False}.get(words.pop()) if len(words) == 1 else None


PARSERS = {"strategy": parse_score, "factual": parse_verdict}


def load_template(kind: Literal["strategy", "factual"], path: str | None = None) -> string.Template:
    """The prompt template for `kind`: the file at `path`, or the packaged default; placeholders checked."""
    if path is None:
        text = resources.files("grpo_fast.rewards").joinpath("prompts", f"{kind}.txt").read_text(encoding="utf-8")
        source = f"default {kind} prompt"
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        source = f"{kind} prompt {path}"
    template = string.Template(text)
    if not template.is_valid():
        raise ValueError(f"{source}: a '$' that starts no placeholder (write '$$' for a literal dollar sign)")
    used, allowed = set(template.get_identifiers()), TEMPLATE_FIELDS["strategy"]
    if used - allowed:
        raise ValueError(f"{source}: unknown placeholders {sorted(used - allowed)}; allowed: {sorted(allowed)}")
    if TEMPLATE_FIELDS[kind] - used:
        raise ValueError(f"{source}: missing placeholders {sorted(TEMPLATE_FIELDS[kind] - used)}")
    return template


def image_data_url(image: str | os.PathLike[str] | Image.Image) -> tuple[str, str]:
    """(base64 data URL, sha256 of the bytes) for an image file path or a PIL image (sent as PNG)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    else:
        mime = mimetypes.guess_type(os.fspath(image))[0]
        if mime is None or not mime.startswith("image/"):
            raise ValueError(f"image {os.fspath(image)!r} has no image file extension (.png, .jpg, .webp, ...)")
        with open(image, "rb") as f:
            data = f.read()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}", hashlib.sha256(data).hexdigest()


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date); None if absent."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) * scale, 0.0)
        except ValueError:
            date = email.utils.parsedate_tz(value)
            if date is not None:
                return max(email.utils.mktime_tz(date) - time.time(), 0.0)
    return None


class MalformedReply(Exception):
    """A 200 whose body is not the API's JSON (a proxy's error page, a reply cut short): retried."""


class StatusError(Exception):
    """A reply with an error status; `message` is the API's error message when the body has one."""

    def __init__(self, response: httpx2.Response) -> None:
        self.status, self.headers = response.status_code, response.headers
        self.message = error_message(response.content)
        super().__init__(f"HTTP {self.status}: {self.message}")


def error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's text (cut at 300 characters)."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        pass
    return body.decode(errors="replace").strip()[:300]


def reply_text(body: Any, api: JudgeApi) -> str:
    """The reply's text in a decoded Chat Completions or Responses body ("" when it holds none); MalformedReply
    when `body` is neither."""
    try:
        if api == "responses":  # what the client's `Response.output_text` joins
            parts = [part for item in body["output"] if item["type"] == "message" for part in item["content"]]
            return "".join(part.get("text") or "" for part in parts if part["type"] == "output_text")
        return (body["choices"][0]["message"]["content"] or "") if body["choices"] else ""
    except (KeyError, IndexError, TypeError) as e:
        raise MalformedReply(f"not a {api} reply: {str(body)[:80]!r}") from e


def backoff_s(retry: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with "equal jitter": half the doubled delay fixed, half uniform random."""
    delay = min(base_s * 2**retry, max_s)
    return delay / 2 + random.uniform(0, delay / 2)


@dataclass(frozen=True)
class _Request:
    kind: Literal["strategy", "factual"]
    key: str  # cache key: model, rendered prompt, image hash
    prompt: str
    image: bytes | None  # the image's data URL as a JSON string, shared by every request of the batch that sends it


@dataclass(frozen=True)
class _Failed:
    reason: str


class LLMJudge:
    """A `Judge` that asks an OpenAI-compatible model; see the module docstring for the policy.

    Synchronous like every judge: `judge()` runs the batch on an event loop the judge owns and returns once
    every verdict is in. Call `close()` (or use `with`) to release the connections and the cache.
    """

    required_fields = ("image", "question", "level")  # what an item needs to be scored

    def __init__(self, config: LLMJudgeConfig) -> None:
        if not config.model:
            raise ValueError("the LLM judge needs a model name: pass --judge-model NAME")
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise ValueError(
                f"the LLM judge reads its API key from ${config.api_key_env}, which is unset or empty "
                f"(for a local server that ignores keys, set it to any value, e.g. {config.api_key_env}=EMPTY)"
            )
        self.config = config
        self.templates = {kind: load_template(kind, getattr(config, f"{kind}_prompt")) for kind in PARSERS}
        self.cache = JudgeCache(config.cache_path) if config.cache_path else None
        self._http = openai.DefaultAsyncHttpxClient(transport=JudgeTransport(config.max_in_flight))
        # max_retries=0: the retry policy is ours (Retry-After, no retry on 4xx, counted for metrics).
        self._client = openai.AsyncOpenAI(
            api_key=api_key, base_url=config.base_url, timeout=config.timeout_s, max_retries=0, http_client=self._http
        )
        self._url = httpx2.URL(str(self._client.base_url) + ROUTES[config.api])  # base_url ends in "/"
        headers = self._client.default_headers | self._client.auth_headers  # absent optional ones are `Omit`s
        self._headers = httpx2.Headers({name: value for name, value in headers.items() if isinstance(value, str)})
        self._timeouts = httpx2.Timeout(config.timeout_s).as_dict()
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._runner: asyncio.Runner | None = None
        self.last_stats = JudgeStats()  # the latest batch
        self.total_stats = JudgeStats()  # everything since construction
        self._unreported = JudgeStats()  # since the latest metrics() call
        self._last_unparsed = ""  # the latest reply without a valid score or verdict, for the batch's warning

    def judge(self, items: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[Judgment | None]:
        """One Judgment per completion, or None where the judge's reply never parsed or the requests failed."""
        if len(items) != len(completions):
            raise ValueError(f"got {len(items)} items for {len(completions)} completions")
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(self._judge_batch(items, completions))

    def metrics(self) -> dict[str, float]:
        """The counters since the previous call (every batch: training and evaluation) as `judge/<name>` metrics."""
        unreported, self._unreported = self._unreported, JudgeStats()
        return unreported.as_metrics()

    def close(self) -> None:
        if self._runner is not None:
            self._runner.run(self._client.close())
            self._runner.close()
            self._runner = None
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _requests(self, items: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[tuple[_Request, ...]]:
        """The (strategy, factual) request pair of each completion; each image is read and encoded once per batch."""
        images: dict[Any, tuple[bytes, str]] = {}
        pairs = []
        for i, (item, completion) in enumerate(zip(items, completions)):
            missing = set(self.required_fields) - item.keys()
            if missing:
                raise ValueError(f"item {i} lacks {sorted(missing)}")
            if item["level"] not in LEVEL_WORDS:
                raise ValueError(f"item {i}: level must be 'ambig' or 'unambig', got {item['level']!r}")
            image_id = id(item["image"]) if isinstance(item["image"], Image.Image) else os.fspath(item["image"])
            if image_id not in images:
                try:
                    url, digest = image_data_url(item["image"])
                except (OSError, ValueError) as e:
                    raise ValueError(f"item {i}: cannot read its image: {e}") from e
                # A data URL is base64 after an image MIME type: nothing in it needs escaping in JSON.
                images[image_id] = b'"' + url.encode("ascii") + b'"', digest
            image, image_hash = images[image_id]
            values = {"level": LEVEL_WORDS[item["level"]], "question": item["question"], "answer": completion}
            pair = []
            for kind, template in self.templates.items():
                prompt = template.substitute(values)
                attached = image if kind == "factual" else None
                key = cache_key(self.config.model, prompt, image_hash if attached else "")
                pair.append(_Request(kind, key, prompt, attached))
            pairs.append(tuple(pair))
        return pairs

    async def _judge_batch(self, items: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[Judgment | None]:
        pairs = self._requests(items, completions)
        stats = self.last_stats = JudgeStats(completions=len(completions))
        try:
            verdicts = await self._verdicts({request.key: request for pair in pairs for request in pair}, stats)
        finally:  # a batch that raised has sent requests too
            for counters in (self.total_stats, self._unreported):
                counters.add(stats)
        judgments = []
        for strategy, factual in pairs:
            score, passed = verdicts.get(strategy.key), verdicts.get(factual.key)
            judgments.append(None if score is None or passed is None else Judgment(score, passed))
        stats.unscorable = judgments.count(None)
        for counters in (self.total_stats, self._unreported):
            counters.unscorable += stats.unscorable
        if stats.unscorable:
            logger.warning(
                "LLM judge: %d of %d completions unscorable (%d requests failed after %d retries; %d replies "
                "without a valid score or verdict, the latest %r)",
                stats.unscorable,
                stats.completions,
                stats.failures,
                self.config.max_retries,
                stats.unparsed,
                self._last_unparsed[:200],
            )
        return judgments

    async def _verdicts(self, requests: dict[str, _Request], stats: JudgeStats) -> dict[str, int | bool]:
        """Parsed verdicts by request key, from the cache or asked concurrently; unscorable keys left out."""
        cached = self.cache.get_many(requests) if self.cache else {}
        verdicts: dict[str, int | bool] = {key: json.loads(value) for key, value in cached.items()}
        stats.cache_hits = len(verdicts)
        pending = [request for key, request in requests.items() if key not in verdicts]
        tasks = [asyncio.create_task(self._ask(request, stats)) for request in pending]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # a fatal error (or Ctrl-C): stop the rest of the batch before raising
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        failed = [answer for answer in answers if isinstance(answer, _Failed)]
        if pending and len(failed) == len(pending):
            raise JudgeUnavailableError(
                f"all {len(pending)} judge requests failed after {self.config.max_retries} retries "
                f"(last: {failed[-1].reason}); is {self.config.base_url or 'the OpenAI API'} reachable?"
            )
        fresh = {r.key: answer for r, answer in zip(pending, answers) if not isinstance(answer, _Failed | None)}
        if self.cache is not None:
            self.cache.put_many({key: json.dumps(value) for key, value in fresh.items()})
        return verdicts | fresh

    async def _ask(self, request: _Request, stats: JudgeStats) -> int | bool | None | _Failed:
        """The parsed verdict; None if the reply did not parse twice; _Failed if the requests kept failing."""
        for attempt in range(2):
            reply = await self._send_with_retries(request, stats)
            if isinstance(reply, _Failed):
                return reply
            verdict = PARSERS[request.kind](reply)
            if verdict is not None:
                return verdict
            stats.unparsed += 1
            self._last_unparsed = reply
            if attempt == 0:
                stats.reasks += 1
                logger.debug("unparseable %s reply %r: asking again", request.kind, reply[:200])
        logger.debug("judge reply without a valid %s twice (last %r): unscorable", request.kind, reply[:200])
        return None

    async def _send_with_retries(self, request: _Request, stats: JudgeStats) -> str | _Failed:
        cfg = self.config
        retry = 0
        while True:
            try:
                async with self._slots:
                    stats.requests += 1
                    return await self._send(request)
            except TRANSPORT_ERRORS as e:  # refused or dropped connections, timeouts (httpx2.TimeoutException)
                reason, after = f"{type(e).__name__}: {e}", None
            except MalformedReply as e:
                reason, after = f"malformed reply: {e}", None
            except StatusError as e:
                if e.status not in RETRYABLE_STATUS and e.status < 500:
                    raise self._fatal(e) from e
                reason = str(e)
                after = retry_after_s(e.headers) if e.status == 429 else None
            if retry == cfg.max_retries:
                stats.failures += 1
                logger.debug("judge request failed after %d retries: %s", cfg.max_retries, reason)
                return _Failed(reason)
            delay = backoff_s(retry, cfg.backoff_base_s, cfg.backoff_max_s) if after is None else after
            retry += 1
            stats.retries += 1
            logger.debug("judge request retry %d in %.2f s after %s", retry, delay, reason)
            await asyncio.sleep(min(delay, cfg.backoff_max_s))

    async def _send(self, request: _Request) -> str:
        """One request through the configured API; the reply's text ("" if it has none); StatusError on an error
        status; MalformedReply when the body is not the API's JSON."""
        body, timeouts = self._body(request), {"timeout": self._timeouts}
        response = await self._http.send(
            httpx2.Request("POST", self._url, headers=self._headers, content=body, extensions=timeouts)
        )
        if not response.is_success:
            raise StatusError(response)
        try:
            reply = json.loads(response.content)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise MalformedReply(f"invalid JSON ({e})") from e
        return reply_text(reply, self.config.api)

    def _body(self, request: _Request) -> bytes:
        """The request's JSON. The image, if any, is the document's last value: it is serialised as "" and its
        JSON string spliced in at the last '""', so a large image is not re-encoded for every request."""
        cfg = self.config
        body: dict[str, Any] = {"model": cfg.model}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        content: Any = request.prompt  # text-only requests as a plain string: some local servers take nothing else
        if cfg.api == "responses":
            if request.image is not None:
                content = [{"type": "input_text", "text": request.prompt}, {"type": "input_image", "image_url": ""}]
            body["input"] = [{"role": "user", "content": content}]
        else:
            if request.image is not None:
                content = [{"type": "text", "text": request.prompt}, {"type": "image_url", "image_url": {"url": ""}}]
            body["messages"] = [{"role": "user", "content": content}]
        text = json.dumps(body).encode()
        if request.image is None:
            return text
        at = text.rindex(b'""')
        return text[:at] + request.image + text[at + 2 :]

    def _fatal(self, error: StatusError) -> JudgeRequestError:
        hint = FATAL_HINTS.get(error.status, "").format(env="$" + self.config.api_key_env)
        where = self.config.base_url or "the OpenAI API"
        return JudgeRequestError(
            f"LLM judge: HTTP {error.status} from {where} for model {self.config.model!r}: {error.message}"
            + (f" -- {hint}" if hint else "")
        )
