"""What one peer may hold of a service: time for a handshake and a request, sizes, connections at once.

The certificate says who may connect; it says nothing about how long, how much or how often. Without these
bounds any identity from our CA — even one on no allow-list — could open connections and never send a
request, or send one a byte at a time, until the service runs out of file descriptors and cannot call its
own next hop. Yet a bound is itself a lever: a cap that a stranger can fill locks everyone else out. So no
bound here can be filled by one party to the exclusion of another:

- **Unauthenticated connections** (accepted, TLS handshake not finished) are capped (`max_handshakes`):
  each costs a descriptor, and a handshake a signature and a chain verification. At the cap a newcomer is
  never refused; the oldest of them is shed instead — first one that has not sent a byte, then the oldest
  handshake. A caller's own handshake takes milliseconds, so it is always among the youngest and survives
  any number of sockets that sit and wait; a flood can only delay it by opening `max_handshakes` new
  connections within those milliseconds, which is a flood of packets no application can out-run.
- **The first byte** (the ClientHello) must come within `first_byte_timeout`, and the whole handshake
  within `handshake_timeout` of the accept: an idle socket is closed long before the handshake deadline.
- **Established connections** have a cap of their own (`max_connections`), so unauthenticated sockets can
  never push out an authenticated one. Each caller (a SPIFFE ID, else a certificate) may hold at most
  `max_connections_per_caller`: past it, *its own* connection idle longest is closed, never another
  caller's — and if all of its connections are busy, the new one is refused. At the global cap the
  caller holding the most connections gives up its connection idle longest, the same way.
- **A request** must arrive whole within `request_timeout`, from the handshake or its first byte: uvicorn
  starts its keep-alive timer only after a first response. httptools bounds neither headers nor chunked
  bodies: the `RequestLimits` mixin does, in uvicorn's parser callbacks, and refuses a request to switch
  protocols (`Upgrade`, `CONNECT`): no route speaks anything but HTTP/1.1, and a switched connection
  would leave our bookkeeping for good.
- **Closing** a connection waits at most `shutdown_timeout` for the peer's TLS close_notify (asyncio's
  default is 30 s, long enough for a peer that never answers to hold the descriptor).

A service runs with its soft limit on open files raised to the hard one (`raise_open_files_limit`), and
`max_connections` defaults to half of it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from shared.inbound.connections import connections, peer_address
from shared.observability.metrics import Counter
from shared.problem import Problem

__all__ = [
    "ConnectionLimits",
    "Deadline",
    "DeclaredBodyLimit",
    "RequestLimits",
    "connections_closed",
    "raise_open_files_limit",
    "sampled_log",
]

log = logging.getLogger("mesh.limits")
connections_closed = Counter(
    "mesh_connections_closed_total",
    "Connections closed by the service's limits: over a deadline, shed, or refused at a cap",
    ["reason"],
)


@dataclass(frozen=True)
class ConnectionLimits:
    first_byte_timeout: float = 3.0  # seconds from TCP accept to the peer's first byte (its ClientHello)
    handshake_timeout: float = 10.0  # seconds from TCP accept to a finished TLS handshake
    request_timeout: float = 10.0  # seconds to send a whole request, from the handshake or its first byte
    shutdown_timeout: float = 2.0  # seconds a closing connection waits for the peer's TLS close_notify
    max_connections: int = 512  # established connections
    max_connections_per_caller: int = 128  # established connections of one caller (above httpx's pool of 100)
    max_handshakes: int = 1024  # unauthenticated connections: accepted, handshake not finished
    max_header_bytes: int = 16 * 1024  # request line and headers
    max_body_bytes: int = 64 * 1024  # bodies: declared ones get a 413, chunked ones are counted as they arrive


class SampledLog:
    """At most one line per event and second, saying how many were left out before it.

    For what an unauthenticated flood makes happen thousands of times a second (deadlines, sheds): a line each
    would cost the service more than the connection did, and fill its disk. The counters count every one.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, event: str, **extra: Any) -> None:
        now = time.monotonic()
        if now < self._next.get(event, 0.0):
            self._left_out[event] = self._left_out.get(event, 0) + 1
            return
        self._next[event] = now + self.interval
        if left_out := self._left_out.pop(event, 0):
            extra["not_logged_before"] = left_out
        log.warning(event, extra=extra)


sampled_log = SampledLog()


class Deadline:
    """Abort a connection unless what it is doing (the handshake, a request) ends in time; log and count it.

    `sampled`: log through `sampled_log` (for connections whose peer is still unauthenticated)."""

    def __init__(self, sampled: bool = False) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self.sampled = sampled

    def arm(self, stage: str, seconds: float, transport: asyncio.BaseTransport, what: str = "") -> None:
        """Start the clock for `stage` (`what`: how the log says it), unless one is already running (the first
        request keeps the handshake's)."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                seconds, self._expired, stage, what or f"complete {stage}", seconds, transport
            )

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, stage: str, what: str, seconds: float, transport: Any) -> None:
        self._timer = None
        reason = f"no {what} within {seconds:g} s"
        if self.sampled:
            sampled_log.warning(f"{stage}_timeout", peer=peer_address(transport), reason=reason)
        else:
            log.warning(f"{stage}_timeout", extra={"peer": peer_address(transport), "reason": reason})
        connections_closed.inc(reason=f"{stage}_timeout")
        transport.abort()


class RequestLimits:
    """Mixed into uvicorn's httptools protocol: bounded headers and chunked bodies, no protocol switch, a
    deadline per request, and each request's start and end told to the connection table (idle or busy).

    Raising in a parser callback makes uvicorn answer 400 (with our reason) and close the connection. (With
    h11, uvicorn's `h11_max_incomplete_event_size` bounds the headers.) The deadline runs from the
    connection's start — the first request must follow the handshake — or from a request's first byte, to its
    last.
    """

    limits: ConnectionLimits = ConnectionLimits()
    transport: asyncio.Transport
    parser: Any
    _header_bytes = 0
    _body_bytes = 0
    _length_declared = False
    _refusal: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._request_deadline = Deadline()
        super().connection_made(transport)  # type: ignore[misc]
        self._request_deadline.arm("request", self.limits.request_timeout, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._request_deadline.disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_message_begin(self) -> None:
        self._header_bytes = self._body_bytes = 0
        self._length_declared = False
        self._request_deadline.arm("request", self.limits.request_timeout, self.transport)
        connections.busy(self)  # type: ignore[arg-type]
        super().on_message_begin()  # type: ignore[misc]

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        self._length_declared |= name.lower() == b"content-length"
        super().on_header(name, value)  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        # uvicorn would hand an upgraded connection to its WebSocket protocol (whose end we never see), or with
        # ws="none" leave the parser stuck in the upgrade: refuse it before either.
        if self.parser.should_upgrade():
            self._refuse_request(
                "upgrade",
                "this service switches to no other protocol (Upgrade, CONNECT): send plain HTTP/1.1 requests",
            )
        super().on_headers_complete()  # type: ignore[misc]

    def on_body(self, body: bytes) -> None:
        # A declared length is refused up front (413, DeclaredBodyLimit); an undeclared one is counted here,
        # whether or not the route reads it.
        self._body_bytes += len(body)
        if not self._length_declared and self._body_bytes > self.limits.max_body_bytes:
            self._refuse_request("body_too_large", f"request body exceeds {self.limits.max_body_bytes} bytes")
        super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self._request_deadline.disarm()
        super().on_message_complete()  # type: ignore[misc]

    def on_response_complete(self) -> None:
        connections.idle(self)  # type: ignore[arg-type]
        super().on_response_complete()  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        super().send_400_response(self._refusal or msg)  # type: ignore[misc]

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self._refuse_request("headers_too_large", f"request line and headers exceed {limit} bytes")

    def _refuse_request(self, reason: str, why: str) -> None:
        """Answer 400 saying `why`, and close the connection (uvicorn does both when a parser callback raises)."""
        log.warning("request_refused", extra={"peer": peer_address(self.transport), "reason": why})
        connections_closed.inc(reason=reason)
        self._refusal = why
        raise ValueError(why)


class DeclaredBodyLimit:
    """ASGI middleware: refuse a body larger than `max_bytes` before reading it (413), or while reading it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            detail = f"request bodies are limited to {self.max_bytes} bytes"
            response = JSONResponse(
                Problem(413, "content-too-large", "Content too large", detail).body(),
                status_code=413,
                media_type="application/problem+json",
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise Problem(413, "content-too-large", "Content too large", "request body too large")
            return message

        await self.app(scope, limited_receive, send)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
