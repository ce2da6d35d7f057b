"""The LLM judge's HTTP transport for plain-HTTP endpoints: httpx over asyncio sockets, in small connection pools.

Against a fast local endpoint (vLLM, SGLang, the stub) the judge is bound by its own CPU per request, and the stock
httpx transport spent most of it in two places (py-spy, 32 / 128 requests in flight, 2-core AMD EPYC):

- anyio, under httpcore (a third of the client's CPU): a cancel scope per read and write, and a socket probe
  (`getpeername`, `poll`) of every idle connection each time the pool looks for a free one. Here a connection is
  an `asyncio.Protocol`: a read waits, under `asyncio.timeout`, for a buffer the event loop fills; an idle
  connection is readable when that buffer holds data or the server has closed it, which is what the probe asks.
- the pool's walk over all its connections, twice per request (17% of the client at 32 connections, 30-40% at
  128). Here requests are spread over pools of at most `POOL_SIZE` connections, each request on the pool with the
  fewest open, so each walk is short; the judge's own cap on requests in flight keeps every pool within its size.

A request's header and body writes go out in one `send` when its reply is awaited, not in two.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpcore2
import httpx2

POOL_SIZE = 8  # connections per pool: a pool's walk over its connections stays a few microseconds
KEEPALIVE_S = 5.0  # httpx's default: a connection idle for longer is closed rather than reused


class _Connection(asyncio.Protocol, httpcore2.AsyncNetworkStream):
    """One TCP connection as httpcore's network stream, driven by the event loop's callbacks.

    The received bytes need no flow control: `read` returns without waiting while any are buffered, so the reader
    drains the buffer before the event loop can add to it again.
    """

    _transport: asyncio.Transport  # set by connection_made, before the backend hands the connection out

    def __init__(self) -> None:
        self._received = bytearray()
        self._pending: list[bytes] = []  # writes not yet sent: they go out together on the next read
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None

    # asyncio.Protocol: called by the event loop
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._received += data
        self._wake()

    def eof_received(self) -> None:
        self._eof = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof, self._error = True, exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # httpcore2.AsyncNetworkStream: called by httpcore
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._flush()
        if not self._received and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError as e:
                raise httpcore2.ReadTimeout(f"no reply within {timeout} s") from e
            finally:
                self._waiter = None
        if not self._received and self._error is not None:
            raise httpcore2.ReadError(str(self._error)) from self._error
        data = bytes(self._received[:max_bytes])
        del self._received[:max_bytes]
        return data  # b"" once the server has closed the connection

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._transport.is_closing():
            raise httpcore2.WriteError("the connection is closed")
        if buffer:
            self._pending.append(buffer)

    def _flush(self) -> None:
        if self._pending and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    async def aclose(self) -> None:
        self._pending.clear()
        self._transport.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of an idle connection before reuse: data or a close from the server
            # A close that came while no batch ran is already seen: each batch starts with the loop's `select`.
            return bool(self._received) or self._eof
        names = {"socket": "socket", "client_addr": "sockname", "server_addr": "peername"}
        return self._transport.get_extra_info(names[info]) if info in names else None


class _AsyncioBackend(httpcore2.AsyncNetworkBackend):
    """Opens `_Connection`s with the running event loop (TCP_NODELAY is asyncio's default)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                local = (local_address, 0) if local_address else None
                transport, connection = await loop.create_connection(_Connection, host, port, local_addr=local)
        except TimeoutError as e:
            raise httpcore2.ConnectTimeout(f"no connection to {host}:{port} within {timeout} s") from e
        except OSError as e:
            raise httpcore2.ConnectError(str(e)) from e
        for option in socket_options or ():
            transport.get_extra_info("socket").setsockopt(*option)
        return connection

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Pool(httpx2.AsyncHTTPTransport):
    """httpx's HTTP/1.1 transport on at most `size` `_AsyncioBackend` connections, kept alive."""

    def __init__(self, size: int) -> None:
        # No TLS runs here (https:// goes to httpx's own transport), so a bare context spares loading the CA
        # bundle: tens of ms a pool.
        super().__init__(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        # httpx's transport takes no network backend, so its pool is swapped for one that has ours.
        self._pool = httpcore2.AsyncConnectionPool(
            max_connections=size,
            max_keepalive_connections=size,
            keepalive_expiry=KEEPALIVE_S,
            network_backend=_AsyncioBackend(),
        )


class _Release(httpx2.AsyncByteStream):
    """A response body that calls `release` once when closed (httpx closes it once the body is read)."""

    def __init__(self, stream: httpx2.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream, self._release = stream, release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, lambda: None
            release()


class LanePools(httpx2.AsyncBaseTransport):
    """`max_connections` keep-alive connections in pools of at most POOL_SIZE; a request goes to the pool with the
    fewest requests open, so with at most `max_connections` open at once no request waits for a connection."""

    def __init__(self, max_connections: int) -> None:
        count = math.ceil(max_connections / POOL_SIZE)
        self._pools = [_Pool(math.ceil(max_connections / count)) for _ in range(count)]
        self._open = [0] * count  # requests open (sent, body not yet closed) by pool

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        lane = min(range(len(self._pools)), key=self._open.__getitem__)
        self._open[lane] += 1
        try:
            response = await self._pools[lane].handle_async_request(request)
        except BaseException:
            self._open[lane] -= 1
            raise
        response.stream = _Release(response.stream, lambda: self._release(lane))
        return response

    def _release(self, lane: int) -> None:
        self._open[lane] -= 1

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class JudgeTransport(httpx2.AsyncBaseTransport):
    """http:// requests on LanePools; https:// ones on httpx's own transport, as a TLS endpoint is remote and its
    latency (~1 s a reply), not the client's CPU, sets the pace."""

    def __init__(self, max_in_flight: int) -> None:
        limits = httpx2.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
        self._plain, self._tls = LanePools(max_in_flight), httpx2.AsyncHTTPTransport(limits=limits)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        transport = self._plain if request.url.scheme == "http" else self._tls
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._plain.aclose()
        await self._tls.aclose()
