"""The TLS handshake, done by us rather than by uvicorn, so that refusals are seen and the peer is known.

When asyncio (or uvloop) terminates TLS for a server and the handshake fails, the error is dropped — it is
an OSError, logged only in the loop's debug mode, and no TLS alert is sent either (CPython issue 98078).
Operators then cannot see who was refused or why. So uvicorn is given no SSL context at all: each
connection starts as plain TCP, and `TLSTermination` upgrades it with asyncio's public `loop.start_tls()`,
which raises the handshake's error where we can log it — peer address and OpenSSL's reason, at WARNING.
On success it reads the verified peer certificate once (shared.inbound.asgi) and starts uvicorn's HTTP protocol on
the TLS transport exactly as if uvicorn had done the handshake.

It touches one uvicorn internal, the per-connection `self.app`; the end-to-end tests fail loudly if a
uvicorn upgrade changes it. There is no plaintext mode: without an SSLContext the class refuses to build.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # pyproject.toml brings httptools

from shared.inbound.asgi import IDENTITY_KEY, expose, tls_extension
from shared.inbound.connections import caller_key, connections, peer_address
from shared.inbound.limits import ConnectionLimits, Deadline, RequestLimits, connections_closed, sampled_log
from shared.inbound.onewrite import OneWriteResponses
from shared.observability import Counter, recent
from shared.tls.live import Recheck

__all__ = ["TLSHttpToolsProtocol", "TLSTermination", "tls_protocol"]

log = logging.getLogger("mesh.tls")
tls_refusals = Counter("mesh_tls_refusals_total", "TLS handshakes refused, by OpenSSL's reason", ["reason"])


class TLSTermination:
    """Mixed into a uvicorn HTTP protocol class (see `tls_protocol`): TLS first, then HTTP with a known peer."""

    app: Any
    server_context: Callable[[], ssl.SSLContext]  # the one in force now: rebuilt whenever the files change
    limits: ConnectionLimits
    recheck: Recheck  # LiveTLS.recheck: the trust in force when a handshake completes
    _established = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(connections.unauthenticated) >= self.limits.max_handshakes:
            # Never refuse the newcomer: it is the likeliest to be a real caller mid-handshake. Shed the
            # connection that has waited longest without a byte, or else the oldest handshake (shared.inbound.limits).
            victim = connections.oldest_unauthenticated()
            if victim is not None:
                why = f"{self.limits.max_handshakes} connections are not yet authenticated (the limit): the oldest goes"
                victim_transport = connections.take_out(victim)
                sampled_log.warning("connection_shed", peer=peer_address(victim_transport), reason=why)
                connections_closed.inc(reason="unauthenticated_shed")
                victim_transport.abort()
        connections.accepted(self, transport)
        connections.handshaking += 1
        self._first_byte_deadline = Deadline(sampled=True)
        if self.limits.first_byte_timeout < self.limits.handshake_timeout:  # else the handshake's comes first
            self._first_byte_deadline.arm(
                "first_byte", self.limits.first_byte_timeout, transport, "first byte (ClientHello)"
            )
        self._handshake_deadline = Deadline(sampled=True)
        self._handshake_deadline.arm("handshake", self.limits.handshake_timeout, transport)
        # start_tls() must take the connection over *now*: uvloop starts reading right after this method
        # returns (a pause_reading() here would be undone), and a ClientHello delivered to the HTTP parser
        # would be lost to TLS. So its first step runs eagerly, like a Python 3.12 eager task. Our deadline
        # (above) is the one that counts; asyncio's is only a backstop.
        handshake = asyncio.get_running_loop().start_tls(
            transport,
            self,  # type: ignore[arg-type]
            self.server_context(),
            server_side=True,
            ssl_handshake_timeout=self.limits.handshake_timeout + 5,
            ssl_shutdown_timeout=self.limits.shutdown_timeout,
        )
        _run_eagerly(handshake, lambda outcome: self._settle(transport, outcome))
        if not transport.is_closing():
            _FirstBytes.watch(transport, lambda: self._heard_from())

    def _heard_from(self) -> None:
        self._first_byte_deadline.disarm()
        connections.heard_from(self)  # type: ignore[arg-type]

    def _settle(self, raw: asyncio.Transport, outcome: asyncio.Transport | BaseException | None) -> None:
        """The handshake ended (done, refused, timed out, or the peer left): out of the unauthenticated, and
        in — within the caps — or gone."""
        self._first_byte_deadline.disarm()
        try:
            self._handshake_done(raw, outcome)
        finally:
            connections.settled(self)  # type: ignore[arg-type]
        if self._established:
            self._admit()

    def _admit(self) -> None:
        """Keep the caller's new connection within its share and the global cap (shared.inbound.limits): its own
        idle connection goes first; the new one is refused only if none of that caller's is idle."""
        entry = connections.established.get(self)  # type: ignore[call-overload]
        if entry is None:  # closed while it was being let in
            return
        key = caller_key(entry[1])
        per_caller, total = self.limits.max_connections_per_caller, self.limits.max_connections
        if connections.held_by(key) > per_caller:
            self._make_room(
                key,
                f"{key or 'a caller without a certificate'} holds {per_caller} connections (the limit per caller)",
                "caller_limit",
            )
        elif len(connections.established) > total and (holder := connections.largest_holder()) is not None:
            self._make_room(holder, f"{total} connections are established (the limit)", "limit")

    def _make_room(self, key: str, why: str, reason: str) -> None:
        victim = connections.oldest_idle(key, sparing=self)  # type: ignore[arg-type]
        if victim is None:
            self._refuse(connections.take_out(self), why + ", and all of them are busy", reason)  # type: ignore[arg-type]
        else:
            self._refuse(connections.take_out(victim), why + ": its connection idle longest goes", reason)

    def _handshake_done(self, raw: asyncio.Transport, outcome: asyncio.Transport | BaseException | None) -> None:
        connections.handshaking -= 1
        self._handshake_deadline.disarm()
        peer = peer_address(raw)
        if isinstance(outcome, ssl.SSLError):
            reason = getattr(outcome, "verify_message", None) or outcome.reason or str(outcome)
            log.warning("tls_refused", extra={"peer": peer, "reason": reason, "error": str(outcome)})
            tls_refusals.inc(reason=reason)
            recent.record("tls", "deny", reason, peer=peer)
            raw.close()
        elif (
            isinstance(outcome, BaseException)
            or outcome is None
            or outcome.is_closing()
            or outcome.get_extra_info("ssl_object") is None
        ):
            # The peer went away before the handshake finished (a TCP-only health probe does exactly that),
            # or our deadline aborted it (and said so).
            log.debug("tls_aborted", extra={"peer": peer, "error": repr(outcome)})
            raw.close()
        elif reason := self._no_longer_good(outcome.get_extra_info("ssl_object")):
            log.warning("tls_refused", extra={"peer": peer, "reason": reason, "error": "refused by the trust in force"})
            tls_refusals.inc(reason=reason)
            recent.record("tls", "deny", reason, peer=peer)
            outcome.abort()
        else:
            # Checked and registered in this one callback, on the event loop that also runs the reloads: a
            # trust change lands either before it (and the check above sees it) or after it (and its
            # close_where finds this connection in the table). Nothing of the request has been read yet.
            self._established = True
            extension = tls_extension(outcome.get_extra_info("ssl_object"))
            super().connection_made(outcome)  # type: ignore[misc]
            connections.add(self, outcome, extension[IDENTITY_KEY])  # type: ignore[arg-type]
            self.app = expose(self.app, extension)

    def _no_longer_good(self, ssl_object: ssl.SSLObject) -> str | None:
        """Why the trust in force *now* refuses this peer, or None — for every handshake, not only resumed ones.

        The context was chosen when the connection opened; a revocation, or a CA retired or replaced, may have
        come before the peer's last flight arrived (an attacker can hold it back at will). And a resumed
        handshake checks no certificate at all: we issue no session tickets (shared.tls), but Python offers no
        switch for OpenSSL's TLS 1.2 session-ID cache. So the peer is checked here as a full handshake would
        check it now (LiveTLS.recheck): set lookups, computed once per reload.
        """
        if ssl_object.session_reused and not ssl_object.getpeercert(True):
            return "resumed session without a certificate to check"
        return self.recheck(ssl_object)

    def _refuse(self, transport: asyncio.BaseTransport, why: str, reason: str) -> None:
        log.warning("connection_refused", extra={"peer": peer_address(transport), "reason": why})
        connections_closed.inc(reason=reason)
        transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        connections.remove(self)  # type: ignore[arg-type]
        # A connection whose handshake failed was never handed to uvicorn: nothing of its state to tear down.
        if self._established:
            super().connection_lost(exc)  # type: ignore[misc]


class _FirstBytes(asyncio.BufferedProtocol):
    """Stands between a raw transport and the TLS protocol start_tls() gave it until the peer's first bytes
    arrive, says so, and steps aside: the one way to see a ClientHello arrive without reading it ourselves."""

    def __init__(self, transport: asyncio.Transport, tls: Any, heard: Callable[[], None]) -> None:
        self.transport, self.tls, self.heard = transport, tls, heard

    @classmethod
    def watch(cls, transport: asyncio.Transport, heard: Callable[[], None]) -> None:
        transport.set_protocol(cls(transport, transport.get_protocol(), heard))

    def get_buffer(self, sizehint: int) -> Any:
        return self.tls.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.tls.buffer_updated(nbytes)
        finally:
            self.transport.set_protocol(self.tls)
            self.heard()

    def eof_received(self) -> bool | None:
        return self.tls.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tls.connection_lost(exc)

    def pause_writing(self) -> None:
        self.tls.pause_writing()

    def resume_writing(self) -> None:
        self.tls.resume_writing()


class TLSHttpToolsProtocol(TLSTermination, RequestLimits, OneWriteResponses, HttpToolsProtocol):
    """uvicorn's fastest HTTP/1.1 protocol, behind our TLS termination and our request limits, each response in
    one write.

    Each connection gets its own instance from uvicorn (with uvicorn's arguments), plus ours, given once per
    service by `tls_protocol`: the server context in force, the limits, and the re-check of a finished handshake.
    """

    def __init__(
        self,
        *args: Any,
        server_context: Callable[[], ssl.SSLContext],
        limits: ConnectionLimits,
        recheck: Recheck,
        **kwargs: Any,
    ) -> None:
        self.server_context, self.limits, self.recheck = server_context, limits, recheck
        super().__init__(*args, **kwargs)


def tls_protocol(
    context: Callable[[], ssl.SSLContext], limits: ConnectionLimits, recheck: Recheck
) -> Callable[..., asyncio.Protocol]:
    """What uvicorn makes each connection's protocol with: TLSHttpToolsProtocol, terminating TLS with the
    context `context()` returns when the connection comes (uvicorn accepts any callable as `http`).

    uvicorn.run(app, http=tls_protocol(lambda: live.server, config.limits, live.recheck))
    """
    if not isinstance(context(), ssl.SSLContext):
        raise TypeError("a service speaks TLS only: tls_protocol() needs an ssl.SSLContext")
    return functools.partial(TLSHttpToolsProtocol, server_context=context, limits=limits, recheck=recheck)


def _run_eagerly(coroutine: Coroutine[Any, Any, Any], done: Callable[[Any], None]) -> None:
    """Run `coroutine` up to its first wait now, and the rest as the futures it waits on complete.

    `done` receives its result, or the exception it raised. (A minimal Task whose first step is eager.)
    """

    def step(future: asyncio.Future[Any] | None) -> None:
        try:
            waiting_on = coroutine.send(None)  # resuming an `await future` returns its result or raises
        except StopIteration as finished:
            done(finished.value)
        except (Exception, asyncio.CancelledError) as error:
            done(error)
        else:
            waiting_on.add_done_callback(step)

    step(None)
