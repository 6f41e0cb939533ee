"""Outgoing connections on the event loop's own TLS transport, for httpx.

httpx (through httpcore and anyio) runs TLS on a MemoryBIO in pure Python: every record of every
request passes through several Python-level copies and calls. The event loop has a TLS transport of its
own — under uvloop, in compiled code — and asyncio's streams expose it (`open_connection`,
`StreamWriter.start_tls`). This module is the small httpcore "network backend" that uses it. The SSL
context, and so every TLS decision, is still the one from shared.tls; only the plumbing changes.

`make bench` measures the difference (see the README's Performance section).

Each open connection remembers its callee, so that one whose certificate, or whose CA's CRL, has expired since
the handshake can be found and retired (`retire_where`, from services.reloader): a request under way on it
finishes, and its pool closes it before the next, which then needs a new handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

from shared.outbound.callee import CalleeCheck, refuse_unless
from shared.outbound.pool import on_backend
from shared.tls.peer import connection_peer
from shared.x509.identity import PeerIdentity


@contextlib.contextmanager
def _mapped(timeout_error: type[Exception], os_error: type[Exception]) -> Iterator[None]:
    """httpcore's exception types, which httpx turns into its own (ConnectError, ReadTimeout, …)."""
    try:
        yield
    except TimeoutError as e:
        raise timeout_error(str(e) or "timed out") from e
    except (OSError, ssl.SSLError, EOFError) as e:
        raise os_error(str(e) or repr(e)) from e


class Stream(httpcore.AsyncNetworkStream):
    """One outgoing connection, as httpcore reads and writes it; `abort` cuts it without a TLS goodbye."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, check: CalleeCheck) -> None:
        self._reader, self._writer, self._check = reader, writer, check
        self.callee: PeerIdentity | None = None  # once the handshake has passed our check
        self.retired = False  # no request may start on it any more (`retire_where`)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            async with asyncio.timeout(timeout):  # not wait_for: that makes a task of every read
                return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()

    async def aclose(self) -> None:
        # Without a pause: the TLS goodbye finishes in the transport. httpcore's pool closes the connections it
        # drops one after another, and while one close waited for the callee's close_notify, a request could
        # start on the next one it was about to close (a retired connection handed out just before the tick),
        # and have it closed under it: a 502 after the callee had taken the request.
        _open.discard(self)
        self._writer.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            await asyncio.wait_for(self._writer.start_tls(ssl_context, server_hostname=server_hostname), timeout)
        ssl_object = self._writer.get_extra_info("ssl_object")
        refuse_unless(self._check, ssl_object, self._writer.transport.abort)
        self.callee = connection_peer(ssl_object)
        _open.add(self)
        return self

    def abort(self) -> None:
        _open.discard(self)
        self._writer.transport.abort()  # a request under way on it fails; httpcore then drops it from its pool

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks before reusing a pooled connection: has the server closed it meanwhile? (asyncio reads
            # eagerly, so a server's close shows up as end-of-file in the reader.) Yes, too, once it is retired.
            return self.retired or self._reader.at_eof() or self._writer.transport.is_closing()
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        return self._writer.get_extra_info(info)


_open: weakref.WeakSet[Stream] = weakref.WeakSet()  # every checked connection of this process, until closed


def retire_where(should_retire: Callable[[PeerIdentity], bool]) -> int:
    """Retire every open outgoing connection whose callee matches; return how many. A request under way on it
    finishes (as on a pool a reload replaces: it was sent to a callee trusted then); its pool closes it before
    the next request. Cutting it instead failed requests in flight when a callee's renewed certificate let its
    old one expire under a busy connection, and at the end of a CA rollover."""
    doomed = [stream for stream in list(_open) if stream.callee is not None and should_retire(stream.callee)]
    for stream in doomed:
        stream.retired = True
        _open.discard(stream)
    return len(doomed)


class NativeTLSBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, check: CalleeCheck) -> None:
        self._check = check  # who the callee must be, after each handshake (shared.outbound.callee)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Stream(reader, writer, self._check)

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError("unix sockets are not used in the mesh")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def transport(context: ssl.SSLContext, limits: httpx.Limits, check: CalleeCheck) -> httpx.AsyncHTTPTransport:
    """httpx's own transport, with its connection pool on NativeTLSBackend, every callee checked by `check`."""
    return on_backend(httpx.AsyncHTTPTransport(verify=context, limits=limits), context, limits, NativeTLSBackend(check))
