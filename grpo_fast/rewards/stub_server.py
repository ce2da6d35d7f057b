"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for tests, benchmarks and dry runs of the LLM judge.

It speaks `POST /v1/chat/completions` and `POST /v1/responses`, waits `latency_s`, and answers with whatever
the `reply` function returns for the request: a text, or a `StubReply` with an HTTP status, headers (say
Retry-After) or a longer delay (to provoke client timeouts). Every request is recorded. The server stops when
its `with` block ends, on `stop()`, or by itself after `lifetime_s`, so a forgotten server cannot linger.

    with StubServer(lambda request: "<score>4</score>", latency_s=0.05) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused")

Run standalone (`python -m grpo_fast.rewards.stub_server --latency 0.05`) it serves `hash_reply`, which
gives every prompt a fixed pseudo-random score and verdict: enough to dry-run `--judge llm` without a model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class StubRequest:
    """One request as the server received it: the route, the JSON body and when it arrived."""

    path: str
    body: dict[str, Any]
    arrived: float  # time.monotonic()

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


ReplyFn = Callable[[StubRequest], "StubReply | str"]


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
        self, reply: ReplyFn = hash_reply, *, latency_s: float = 0.0, lifetime_s: float = 300.0, port: int = 0
    ) -> None:
        self.reply = reply
        self.latency_s = latency_s
        self.requests: list[StubRequest] = []
        self.peak_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # set first: wakes requests still waiting out their delay
        self._closed = threading.Event()  # set once the port is closed
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.stub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        """The base URL to give an OpenAI client (ends in /v1)."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> StubServer:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stops serving and wakes any request still waiting out its delay; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._closed.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until the server has stopped and closed its port (or `timeout_s` passes); True if it has."""
        return self._closed.wait(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Records the request, waits its delay, and returns (status, headers, JSON body)."""
        request = StubRequest(path=path, body=body, arrived=time.monotonic())
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            scripted = self.reply(request)
            scripted = StubReply(text=scripted) if isinstance(scripted, str) else scripted
            self._stopped.wait(self.latency_s if scripted.delay_s is None else scripted.delay_s)
        finally:
            with self._lock:
                self._in_flight -= 1
        if scripted.status != 200:
            error = {"message": scripted.text or f"stub error {scripted.status}", "type": "stub_error", "code": None}
            return scripted.status, scripted.headers, {"error": error}
        return 200, scripted.headers, _ROUTES[path](body.get("model", ""), scripted.text)


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

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path not in _ROUTES:
            error = {"message": f"no route {self.path}", "type": "invalid_request_error", "code": None}
            self._send(404, {}, {"error": error})
            return
        self._send(*self.server.stub._answer(self.path, body))

    def _send(self, status: int, headers: dict[str, str], payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and benchmarks send thousands of requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each reply waits")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="seconds until the server stops by itself")
    args = parser.parse_args()
    server = StubServer(latency_s=args.latency, lifetime_s=args.lifetime, port=args.port).start()
    print(f"stub OpenAI-compatible server at {server.url} (stops after {args.lifetime:.0f} s)", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
