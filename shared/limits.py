"""What one caller may hold of a service: time for a handshake and a request, sizes, connections at once.

The certificate says who may connect; it says nothing about how long, how much or how often. Without these
bounds any identity from our CA — even one on no allow-list — could open connections and never send a
request, or send one a byte at a time, until the service runs out of file descriptors and cannot call its
own next hop. uvicorn starts its keep-alive timer only after a first response, and httptools bounds neither
headers nor chunked bodies: the `RequestLimits` mixin does, in uvicorn's parser callbacks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from shared.connections import peer_address
from shared.metrics import Counter
from shared.problem import Problem

__all__ = ["ConnectionLimits", "Deadline", "DeclaredBodyLimit", "RequestLimits", "connections_closed"]

log = logging.getLogger("mesh.limits")
connections_closed = Counter(
    "mesh_connections_closed_total",
    "Connections closed by the service's limits: over a deadline, or over the connection limit",
    ["reason"],
)


@dataclass(frozen=True)
class ConnectionLimits:
    handshake_timeout: float = 10.0  # seconds from TCP accept to a finished TLS handshake
    request_timeout: float = 10.0  # seconds to send a whole request, from the handshake or its first byte
    max_connections: int = 512  # open connections, handshaking or established
    max_handshakes: int = 64  # handshakes in progress: each costs a signature and a chain verification
    max_header_bytes: int = 16 * 1024  # request line and headers
    max_body_bytes: int = 64 * 1024  # bodies: declared ones get a 413, chunked ones are counted as they arrive


class Deadline:
    """Abort a connection unless what it is doing (the handshake, a request) ends in time; log and count it."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, stage: str, seconds: float, transport: asyncio.BaseTransport) -> None:
        """Start the clock for `stage`, unless one is already running (the first request keeps the handshake's)."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(seconds, self._expired, stage, seconds, transport)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, stage: str, seconds: float, transport: Any) -> None:
        self._timer = None
        reason = f"no complete {stage} within {seconds:g} s"
        log.warning(f"{stage}_timeout", extra={"peer": peer_address(transport), "reason": reason})
        connections_closed.inc(reason=f"{stage}_timeout")
        transport.abort()


class RequestLimits:
    """Mixed into uvicorn's httptools protocol: bounded headers and chunked bodies, and a deadline per request.

    Raising in a parser callback makes uvicorn answer 400 and close the connection. (With h11, uvicorn's
    `h11_max_incomplete_event_size` bounds the headers.) The deadline runs from the connection's start — the
    first request must follow the handshake — or from a request's first byte, to its last.
    """

    limits: ConnectionLimits = ConnectionLimits()
    transport: asyncio.Transport
    _header_bytes = 0
    _body_bytes = 0
    _length_declared = False

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
        super().on_message_begin()  # type: ignore[misc]

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        self._length_declared |= name.lower() == b"content-length"
        super().on_header(name, value)  # type: ignore[misc]

    def on_body(self, body: bytes) -> None:
        # A declared length is refused up front (413, DeclaredBodyLimit); an undeclared one is counted here,
        # whether or not the route reads it.
        self._body_bytes += len(body)
        if not self._length_declared and self._body_bytes > self.limits.max_body_bytes:
            raise ValueError(f"request body exceeds {self.limits.max_body_bytes} bytes")
        super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self._request_deadline.disarm()
        super().on_message_complete()  # type: ignore[misc]

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            raise ValueError(f"request line and headers exceed {self.limits.max_header_bytes} bytes")


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
