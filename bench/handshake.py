"""The bare cost of a mutual TLS handshake: both ends in one thread, bytes moved by hand, no network, no
event loop — only the cryptography and OpenSSL's state machines, with the services' own contexts.

`make bench` sets the chain's cold hops against this: what a new connection costs in the mesh beyond it is
the set-up path's own overhead (event loop, transports, peer identity, pools)."""

from __future__ import annotations

import asyncio
import ssl
import statistics
import time
from collections.abc import Callable

import uvloop

# What a service does with a completed handshake before it reads a byte: LiveTLS.recheck, on (client, server).
Check = Callable[[ssl.SSLObject, ssl.SSLObject], None]


def handshake_once(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    server_name: str,
    session: ssl.SSLSession | None = None,
    check: Check | None = None,
) -> ssl.SSLObject:
    """One mutual handshake (resumed if `session` allows), `check`, and one request/response; returns the
    client's side."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=server_name, session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    while not (client_done and server_done):
        if not client_done:
            try:
                c.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            try:
                s.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
    if check is not None:
        check(c, s)
    c.write(b"GET / HTTP/1.1\r\n\r\n")
    s_in.write(c_out.read())
    s.read(64)
    s.write(b"HTTP/1.1 200 OK\r\n\r\n")
    c_in.write(s_out.read())
    c.read(64)
    return c


def bare_handshake_ms(
    server: ssl.SSLContext, client: ssl.SSLContext, server_name: str, runs: int = 300, check: Check | None = None
) -> float:
    """Median milliseconds of `handshake_once`, after a warm-up."""
    for _ in range(20):
        handshake_once(server, client, server_name, check=check)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        handshake_once(server, client, server_name, check=check)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def bare_resumed_handshake_ms(
    server: ssl.SSLContext, client: ssl.SSLContext, server_name: str, runs: int = 300
) -> float:
    """The same, resumed from a TLS 1.3 ticket: what resumption would save. The services issue no tickets
    (a resumed handshake checks no certificate and no CRL), so this uses a copy that does — an experiment."""
    server.num_tickets = 2
    server.options &= ~ssl.OP_NO_TICKET
    session = handshake_once(server, client, server_name).session
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        resumed = handshake_once(server, client, server_name, session)
        samples.append((time.perf_counter() - start) * 1000)
        assert resumed.session_reused
    return statistics.median(samples)


def event_loop_handshake_added_ms(
    server: ssl.SSLContext, client: ssl.SSLContext, server_name: str, runs: int = 500
) -> float:
    """What a TLS connection adds over a TCP one on uvloop's own TLS transport, both ends in one process
    (connect, handshake, one round trip; median of `runs`, after a fifth as many untimed): the event loop's
    share, with no app code at all."""

    async def measure(use_tls: bool) -> float:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(3)
            writer.write(b"OK")
            await writer.drain()
            writer.close()

        listener = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server if use_tls else None)
        port = listener.sockets[0].getsockname()[1]
        samples = []
        for i in range(runs + runs // 5):
            start = time.perf_counter()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client if use_tls else None, server_hostname=server_name if use_tls else None
            )
            writer.write(b"GET")
            await writer.drain()
            await reader.readexactly(2)
            writer.close()
            if i >= runs // 5:
                samples.append((time.perf_counter() - start) * 1000)
        listener.close()
        return statistics.median(samples)

    return uvloop.run(measure(True)) - uvloop.run(measure(False))
