"""A response's head and body leave in one write: one TLS record and one `send()` where uvicorn makes two.

uvicorn writes the status line and headers when the app starts its response, and the body when the app sends it:
two writes, so two TLS records to seal, two system calls, and a caller woken twice for one answer. A JSON route
sends both in the same step of its task, so the connection's transport holds a write until the next one joins
it, or until this turn of the event loop ends — a streamed body that comes later does not hold its head back.
Every write goes through it, so nothing of ours or uvicorn's (a close, a 400 for a pipelined request) overtakes
what it holds; and a caller's end of stream, read in the same turn, lets it go first (below, `eof_received`).
Measured side by side (interleaved, CPU per request): 4 % less CPU for the mTLS chain, 1.5 % for plaintext.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


class HeldHead:
    """A connection's transport as uvicorn sees it: a write waits, at most to the end of the event loop's turn,
    for the next one to leave with it. Everything else goes straight to `transport`."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held = b""

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
            self._transport.write(data)
        elif data:
            self._held = bytes(data)  # as it is now: a transport copies what it cannot send at once
            asyncio.get_running_loop().call_soon(self.flush)

    def writelines(self, lines: Iterable[bytes]) -> None:
        self.write(b"".join(lines))

    def flush(self) -> None:
        held, self._held = self._held, b""
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, abort, get_extra_info, pause_reading, …
        return getattr(self._transport, name)


class OneWriteResponses:
    """Mixed into uvicorn's httptools protocol, before it: the connection's writes go through a `HeldHead`."""

    transport: Any  # uvicorn's: None until connection_made, then our HeldHead

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(HeldHead(transport))  # type: ignore[misc]

    def eof_received(self) -> bool | None:
        # The caller has finished sending — a FIN, or in TLS a close_notify, after which uvloop writes nothing
        # more — possibly in the turn that wrote a HEAD answer (one write, so held): that answer leaves first.
        if isinstance(self.transport, HeldHead):
            self.transport.flush()
        return super().eof_received()  # type: ignore[misc]
