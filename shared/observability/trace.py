"""W3C Trace Context: one trace id for one client request, from A through B to C, in every log line.

The first service to see a request without a valid `traceparent` header starts a trace; each service
passes it on with its own span id (https://www.w3.org/TR/trace-context/#traceparent-header).
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-01"

    def child(self) -> Span:
        """The span of our call to the next hop: same trace, new span id."""
        return Span(self.trace_id, secrets.token_hex(8))


current: ContextVar[Span | None] = ContextVar("mesh_span", default=None)


def continue_or_start(header: str | None) -> Span:
    match = _TRACEPARENT.match(header or "")
    trace_id = match.group(1) if match and match.group(1) != "0" * 32 else secrets.token_hex(16)
    return Span(trace_id, secrets.token_hex(8))


class TraceMiddleware:
    """Pure ASGI (no per-request thread or copy of the body): sets the span for the request's task."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"traceparent"), None)
        token = current.set(continue_or_start(header))
        try:
            await self.app(scope, receive, send)
        finally:
            current.reset(token)
