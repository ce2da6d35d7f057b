"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for tests, benchmarks and dry runs of the LLM judge.

It speaks `POST /v1/chat/completions` and `POST /v1/responses`, waits `latency_s`, and answers with whatever
the `reply` function returns for the request: a text, or a `StubReply` with an HTTP status, headers (say
Retry-After), a longer delay (to provoke client timeouts), a raw body that is not the API's JSON, or a dropped
connection. `Faults` injects these at seeded rates in place of the reply: 5xx, 429 with Retry-After, timeouts,
garbage replies (no score, no verdict), malformed bodies and dropped connections. Every request is recorded, and
counted by what it got (`counts`: "ok" or the fault's name). The server stops when its `with` block ends, on
`stop()` (which also closes the connections clients hold open), or by itself after `lifetime_s`, so a forgotten
server cannot linger; a new server on the same `port` is a restart.

    with StubServer(lambda request: "<score>4</score>", latency_s=0.05) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused")
    with StubServer(hash_reply, faults=Faults(server_error=0.2, rate_limit=0.1, seed=0)) as server: ...

Run standalone (`python -m grpo_fast.rewards.stub_server --latency 0.05`) it serves `hash_reply`, which
gives every prompt a fixed pseudo-random score and verdict: enough to dry-run `--judge llm` without a model;
`--faults server_error=0.2,timeout=0.05` makes it a faulty one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class StubRequest:
    """One request as the server received it: the route, the JSON body, when it arrived and its headers."""

    path: str
    body: dict[str, Any]
    arrived: float  # time.monotonic()
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case

    def _parts(self) -> list[dict[str, Any]]:
        """The content parts of every message, for both APIs (`messages` for chat, `input` for responses)."""
        messages = self.body.get("messages") or self.body.get("input") or []
        if isinstance(messages, str):
            return [{"type": "text", "text": messages}]
        parts: list[dict[str, Any]] = []
        for message in messages:
            content = message.get("content", "")
            parts.extend([{"type": "text", "text": content}] if isinstance(content, str) else content)
        return parts

    @property
    def text(self) -> str:
        """All text parts joined by newlines."""
        return "\n".join(p["text"] for p in self._parts() if p.get("type") in ("text", "input_text"))

    @property
    def image_urls(self) -> list[str]:
        """The image URLs (data URLs for inline images) in the request, in order."""
        urls = []
        for part in self._parts():
            if part.get("type") == "image_url":
                image_url = part["image_url"]
                urls.append(image_url["url"] if isinstance(image_url, dict) else image_url)
            elif part.get("type") == "input_image":
                urls.append(part["image_url"])
        return urls


@dataclass(frozen=True)
class StubReply:
    """A scripted answer: the reply text on 200, else an OpenAI-style error with this status."""

    text: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float | None = None  # overrides the server's latency for this request
    raw: bytes | None = None  # sent as the body (as application/json) instead of the API's JSON
    drop: bool = False  # close the connection without answering


ReplyFn = Callable[[StubRequest], "StubReply | str"]

GARBAGE_TEXT = "I would rather not grade this answer."  # neither a score nor a verdict
MALFORMED_BODY = b'{"id": "chatcmpl-stub", "choices": [{"message": '  # cut short: not JSON
FAULT_NAMES = ("server_error", "rate_limit", "timeout", "garbage", "malformed", "dropped")


@dataclass(frozen=True)
class Faults:
    """Shares of requests (each in [0, 1], summing to at most 1) answered with a fault instead of the reply,
    drawn per request in arrival order from a generator seeded with `seed`."""

    server_error: float = 0.0  # HTTP 500, 502 or 503
    rate_limit: float = 0.0  # HTTP 429 with Retry-After: retry_after_s
    timeout: float = 0.0  # no answer for hang_s seconds (a client with a shorter timeout gives up)
    garbage: float = 0.0  # 200 with a reply text that holds no score and no verdict
    malformed: float = 0.0  # 200 with a body that is not JSON
    dropped: float = 0.0  # the connection closed without an answer
    retry_after_s: float = 1.0
    hang_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = {name: getattr(self, name) for name in FAULT_NAMES}
        if any(not 0 <= rate <= 1 for rate in rates.values()) or sum(rates.values()) > 1:
            raise ValueError(f"fault rates must lie in [0, 1] and sum to at most 1, got {rates}")

    @classmethod
    def parse(cls, text: str) -> Faults:
        """`"server_error=0.2,timeout=0.05,seed=1"` -> Faults; ValueError naming the bad part."""
        known = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name not in known:
                raise ValueError(f"bad fault {part!r}: write name=value with name one of {', '.join(known)}")
            try:
                values[name] = int(value) if name == "seed" else float(value)
            except ValueError:
                raise ValueError(f"bad fault {part!r}: {name} takes a number") from None
        return cls(**values)

    def draw(self, rng: random.Random) -> str | None:
        """One request's fault: a name of FAULT_NAMES, or None (answer it)."""
        x = rng.random()
        for name in FAULT_NAMES:
            x -= getattr(self, name)
            if x < 0:
                return name
        return None

    def reply(self, name: str, rng: random.Random) -> StubReply:
        """What the fault `name` sends."""
        if name == "server_error":
            return StubReply("stub server error", status=rng.choice((500, 502, 503)))
        if name == "rate_limit":
            return StubReply("stub rate limit", status=429, headers={"Retry-After": f"{self.retry_after_s:g}"})
        if name == "timeout":
            return StubReply(delay_s=self.hang_s)
        if name == "garbage":
            return StubReply(GARBAGE_TEXT)
        if name == "malformed":
            return StubReply(raw=MALFORMED_BODY)
        return StubReply(drop=True)


def hash_reply(request: StubRequest) -> str:
    """A deterministic stand-in for a judge: score and verdict drawn from a hash of the prompt."""
    digest = int.from_bytes(hashlib.sha256(request.text.encode()).digest()[:4], "big")
    if request.image_urls:
        return "<verdict>PASS</verdict>" if digest % 4 else "<verdict>FAIL</verdict>"
    return f"<score>{1 + digest % 4}</score>"


def _chat_completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _response(model: str, text: str) -> dict[str, Any]:
    message = {
        "type": "message",
        "id": "msg-stub",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    return {
        "id": "resp-stub",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": [message],
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
    }


_ROUTES = {"/v1/chat/completions": _chat_completion, "/v1/responses": _response}


class StubServer:
    """A threaded OpenAI-compatible server on 127.0.0.1 (an ephemeral port unless `port` is given)."""

    def __init__(
        self,
        reply: ReplyFn = hash_reply,
        *,
        latency_s: float = 0.0,
        lifetime_s: float = 300.0,
        port: int = 0,
        faults: Faults | None = None,
    ) -> None:
        self.reply = reply
        self.latency_s = latency_s
        self.faults = faults
        self.requests: list[StubRequest] = []
        self.counts: Counter[str] = Counter()  # requests by fault drawn: a FAULT_NAMES name, or "ok" (the reply's)
        self.peak_in_flight = 0
        self._in_flight = 0
        self._rng = random.Random(faults.seed if faults else 0)
        self._connections: set[socket.socket] = set()  # open client connections, closed by stop()
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()  # wakes requests still waiting out their delay
        self._closed = threading.Event()  # set once the port is closed
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.stub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The base URL to give an OpenAI client (ends in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> StubServer:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the connections clients keep alive, as a server process that exits would: a
        request still waiting out its delay is woken, and goes unanswered. Safe to call twice."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by the client
                pass
        self._stopped.set()
        self._closed.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until the server has stopped and closed its port (or `timeout_s` passes); True if it has."""
        return self._closed.wait(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(
        self, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes] | None:
        """Records the request, draws its fault, waits its delay, and returns (status, headers, body), or None to
        drop the connection."""
        request = StubRequest(path=path, body=body, arrived=time.monotonic(), headers=headers)
        with self._lock:
            self.requests.append(request)
            fault = self.faults.draw(self._rng) if self.faults else None
            self.counts[fault or "ok"] += 1
            injected = self.faults.reply(fault, self._rng) if fault else None
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            scripted = injected or self.reply(request)
            scripted = StubReply(text=scripted) if isinstance(scripted, str) else scripted
            self._stopped.wait(self.latency_s if scripted.delay_s is None else scripted.delay_s)
        finally:
            with self._lock:
                self._in_flight -= 1
        if scripted.drop:
            return None
        if scripted.raw is not None:
            return scripted.status, scripted.headers, scripted.raw
        if scripted.status != 200:
            error = {"message": scripted.text or f"stub error {scripted.status}", "type": "stub_error", "code": None}
            return scripted.status, scripted.headers, json.dumps({"error": error}).encode()
        return 200, scripted.headers, json.dumps(_ROUTES[path](body.get("model", ""), scripted.text)).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog: a client opening 128 connections at once must not see refusals (the default is 5).
    request_queue_size = 512
    stub: StubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up (timed out) is no error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's connection pool expects
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.stub._lock:
            self.server.stub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.stub._lock:
            self.server.stub._connections.discard(self.connection)
        super().finish()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path not in _ROUTES:
            error = {"message": f"no route {self.path}", "type": "invalid_request_error", "code": None}
            self._send(404, {}, json.dumps({"error": error}).encode())
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        answer = self.server.stub._answer(self.path, body, headers)
        if answer is None:  # a dropped connection: no status line, no body
            self.close_connection = True
            return
        self._send(*answer)

    def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and benchmarks send thousands of requests


def _faults_flag(text: str) -> Faults:
    try:
        return Faults.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each reply waits")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="seconds until the server stops by itself")
    parser.add_argument(
        "--faults",
        type=_faults_flag,
        default=None,
        help=f"fault rates, e.g. server_error=0.2,rate_limit=0.1,seed=1 (names: {', '.join(FAULT_NAMES)})",
    )
    args = parser.parse_args()
    server = StubServer(latency_s=args.latency, lifetime_s=args.lifetime, port=args.port, faults=args.faults).start()
    print(f"stub OpenAI-compatible server at {server.url} (stops after {args.lifetime:.0f} s)", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
