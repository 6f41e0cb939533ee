"""Give the application the certificate the caller presented — uvicorn does not.

The ASGI spec defines a TLS extension (`scope["extensions"]["tls"]`) carrying the client's certificate
chain, but no uvicorn release fills it, and an ASGI middleware cannot reach the socket to do it. So we
subclass uvicorn's HTTP protocol: when a connection is made (after the handshake, so the certificate is
already verified), we read the peer certificate once, work out the caller's identity once, and hand the
same extension to every request on that connection. Keep-alive requests therefore cost no certificate work.

The same class also performs the handshake itself, so that refused handshakes can be logged (see
`TLSExtensionMixin`). It touches one uvicorn internal, the per-connection `self.app`; it is kept tiny and
is covered by the end-to-end tests, which fail loudly if a uvicorn upgrade changes it. When uvicorn
implements the spec, `shared.authz` keeps working from `client_cert_chain` alone.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from shared.identity import CallerIdentity
from shared.metrics import Counter

log = logging.getLogger("mesh.tls")
tls_refusals = Counter("mesh_tls_refusals_total", "TLS handshakes refused, by OpenSSL's reason", ["reason"])
connections_closed = Counter(
    "mesh_connections_closed_total",
    "Connections closed by the service's limits: over a deadline, or over the connection limit",
    ["reason"],
)

# Our addition to the spec's keys: the identity, parsed once per connection.
IDENTITY_KEY = "mtls_mesh.caller"

_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _cipher_table() -> dict[str, int]:
    """OpenSSL cipher name → IANA 16-bit id (the spec wants the number; OpenSSL reports the name)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:@SECLEVEL=0")
    return {c["name"]: c["id"] & 0xFFFF for c in context.get_ciphers()}


CIPHER_IDS = _cipher_table()
CIPHER_NAMES = {v: k for k, v in CIPHER_IDS.items()}
TLS_VERSION_NAMES = {v: k for k, v in _TLS_VERSIONS.items()}


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension for one connection, plus the parsed caller identity."""
    der = ssl_object.getpeercert(binary_form=True)
    caller = CallerIdentity.from_der(der) if der else None
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        # Python < 3.13 exposes only the leaf of the verified chain; the spec allows a partial chain.
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": caller.subject if caller else None,
        "client_cert_error": None,  # under CERT_REQUIRED an invalid certificate never gets this far
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or "", 0),
        "cipher_suite": CIPHER_IDS.get(cipher[0], 0) if cipher else 0,
        IDENTITY_KEY: caller,
    }


@dataclass(frozen=True)
class ConnectionLimits:
    """What one caller may hold of a service: time to finish a handshake and a request, and how many at once.

    The certificate says who may connect; it says nothing about how long or how often. Without deadlines,
    any identity from our CA — even one on no allow-list — could open connections and never send a request,
    until the service runs out of file descriptors and cannot call its own next hop.
    """

    handshake_timeout: float = 10.0  # seconds from TCP accept to a finished TLS handshake
    request_timeout: float = 10.0  # seconds to send a whole request, from the handshake or its first byte
    max_connections: int = 512  # open connections, handshaking or established
    max_handshakes: int = 64  # handshakes in progress: each costs a signature and a chain verification
    max_header_bytes: int = 16 * 1024  # request line and headers
    max_body_bytes: int = 64 * 1024  # a body without a declared length (chunked), counted as it arrives


class ConnectionTable:
    """Every connection of this process, and who is on the other end of the established ones.

    The certificate is checked once, at the handshake, so when it is revoked later its open keep-alive
    connections must be found and closed (see `close_where`); and the limits above need the counts.
    """

    def __init__(self) -> None:
        self.handshaking = 0
        self.established: dict[TLSExtensionMixin, CallerIdentity | None] = {}

    def __len__(self) -> int:
        return self.handshaking + len(self.established)


connections = ConnectionTable()


def close_where(should_close: Callable[[CallerIdentity], bool]) -> int:
    """Close every open connection whose caller matches; return how many were closed."""
    doomed = [
        connection
        for connection, caller in list(connections.established.items())
        if caller is not None and should_close(caller)
    ]
    for connection in doomed:
        connection.transport.close()
    return len(doomed)


class TLSExtensionMixin:
    """Mixed into a uvicorn HTTP protocol class: terminates TLS, then exposes the verified peer to the app.

    Why the handshake happens here and not in uvicorn: when asyncio (or uvloop) terminates TLS for a server
    and the handshake fails, the error is dropped — it is an OSError, logged only in the loop's debug mode,
    and no TLS alert is sent either (CPython issue 98078). Operators then cannot see who was refused or why.
    So uvicorn is given no SSL context at all; each connection starts as plain TCP, and we upgrade it with
    asyncio's public `loop.start_tls()`, which raises the handshake's error where we can log it: peer
    address and OpenSSL's reason, at WARNING. On success the HTTP protocol starts on the TLS transport
    exactly as if uvicorn had done the handshake.

    It also enforces `ConnectionLimits`: uvicorn starts its keep-alive timer only after a first response,
    so a connection that never sends a request, or sends it one byte at a time, would otherwise stay open.
    """

    app: Any
    transport: asyncio.Transport
    ssl_context: ssl.SSLContext | None = None  # set by tls_protocol(); None only for the benchmark's plaintext
    limits: ConnectionLimits = ConnectionLimits()
    # For resumed sessions: why this certificate would be refused by a full handshake now, or None.
    recheck: Callable[[bytes], str | None] | None = None
    _established = False
    _header_bytes = 0
    _body_bytes = 0
    _length_declared = False
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.ssl_context is None:
            super().connection_made(transport)  # type: ignore[misc]
            return
        peer = _address(transport.get_extra_info("peername"))
        if len(connections) >= self.limits.max_connections:
            self._refuse(transport, peer, f"{self.limits.max_connections} connections are open (the limit)")
            return
        if connections.handshaking >= self.limits.max_handshakes:
            self._refuse(transport, peer, f"{self.limits.max_handshakes} handshakes are in progress (the limit)")
            return
        connections.handshaking += 1
        self._arm("handshake", self.limits.handshake_timeout, transport)
        # start_tls() must take the connection over *now*: uvloop starts reading right after this method
        # returns (a pause_reading() here would be undone), and a ClientHello delivered to the HTTP parser
        # would be lost to TLS. So its first step runs eagerly, like a Python 3.12 eager task. Our own
        # deadline (above) is the one that counts; asyncio's is only a backstop.
        handshake = asyncio.get_running_loop().start_tls(
            transport,
            self,
            self.ssl_context,
            server_side=True,
            ssl_handshake_timeout=self.limits.handshake_timeout + 5,
        )
        _run_eagerly(handshake, lambda outcome: self._handshake_done(transport, outcome))

    def _handshake_done(self, raw: asyncio.Transport, outcome: asyncio.Transport | BaseException | None) -> None:
        connections.handshaking -= 1
        self._disarm()
        peer = _address(raw.get_extra_info("peername"))
        if isinstance(outcome, ssl.SSLError):
            reason = getattr(outcome, "verify_message", None) or outcome.reason or str(outcome)
            log.warning("tls_refused", extra={"peer": peer, "reason": reason, "error": str(outcome)})
            tls_refusals.inc(reason=reason)
            raw.close()
        elif (
            isinstance(outcome, BaseException)
            or outcome is None
            or outcome.is_closing()
            or outcome.get_extra_info("ssl_object") is None
        ):
            # The peer went away before the handshake finished (a TCP-only health probe does exactly that),
            # or our deadline aborted it (logged there).
            log.debug("tls_aborted", extra={"peer": peer, "error": repr(outcome)})
            raw.close()
        elif reason := self._resumed_and_no_longer_good(outcome.get_extra_info("ssl_object")):
            log.warning("tls_refused", extra={"peer": peer, "reason": reason, "error": "resumed session refused"})
            tls_refusals.inc(reason=reason)
            outcome.abort()
        else:
            self._tls_connection_made(outcome)

    def _resumed_and_no_longer_good(self, ssl_object: ssl.SSLObject) -> str | None:
        """Why a resumed session must be refused, or None.

        A resumed handshake checks no certificate: not its expiry, not the CRL. We issue no session tickets
        (shared.tls), but Python offers no switch for OpenSSL's TLS 1.2 session-ID cache, so a TLS 1.2 peer
        can still resume. Its certificate is then checked here as a full handshake would check it now.
        """
        if not ssl_object.session_reused:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        if not der or self.recheck is None:
            return "resumed session without a certificate to check"
        return self.recheck(der)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        connections.established.pop(self, None)
        # A connection whose handshake failed was never handed to uvicorn: nothing of its state to tear down.
        if self._established or self.ssl_context is None:
            super().connection_lost(exc)  # type: ignore[misc]

    def _tls_connection_made(self, transport: asyncio.Transport) -> None:
        extension = tls_extension(transport.get_extra_info("ssl_object"))
        self._established = True
        super().connection_made(transport)  # type: ignore[misc]
        connections.established[self] = extension[IDENTITY_KEY]
        self._arm("request", self.limits.request_timeout, transport)
        self._expose(extension)

    def _expose(self, extension: dict[str, Any]) -> None:
        """Hand `extension` to the app as scope["extensions"]["tls"] on every request of this connection."""
        app = self.app

        async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": extension}
            await app(scope, receive, send)

        self.app = app_with_tls

    # ── limits ──────────────────────────────────────────────────────────────────────────────────────────

    def _refuse(self, transport: asyncio.Transport, peer: str, why: str) -> None:
        log.warning("connection_refused", extra={"peer": peer, "reason": why})
        connections_closed.inc(reason="limit")
        transport.abort()

    def _arm(self, stage: str, seconds: float, transport: asyncio.Transport) -> None:
        """Abort the connection unless `stage` (the handshake, or a whole request) ends within `seconds`."""
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(seconds, self._expired, stage, seconds, transport)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, stage: str, seconds: float, transport: asyncio.Transport) -> None:
        self._deadline = None
        peer = _address(transport.get_extra_info("peername"))
        log.warning(f"{stage}_timeout", extra={"peer": peer, "reason": f"no complete {stage} within {seconds:g} s"})
        connections_closed.inc(reason=f"{stage}_timeout")
        transport.abort()

    # httptools puts no bound on the request line and headers, nor on a chunked body; these parser callbacks
    # do. Raising here makes uvicorn answer 400 and close the connection. (With h11, uvicorn's
    # h11_max_incomplete_event_size bounds the headers.) A request must also arrive whole in time.
    def on_message_begin(self) -> None:
        self._header_bytes = self._body_bytes = 0
        self._length_declared = False
        if self.ssl_context is not None:
            self._arm("request", self.limits.request_timeout, self.transport)
        super().on_message_begin()  # type: ignore[misc]

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        self._length_declared |= name.lower() == b"content-length"
        super().on_header(name, value)  # type: ignore[misc]

    def on_body(self, body: bytes) -> None:
        # A declared length is refused up front (413, shared.problem); an undeclared one is counted here,
        # whether or not the route reads it.
        self._body_bytes += len(body)
        if not self._length_declared and self._body_bytes > self.limits.max_body_bytes:
            raise ValueError(f"request body exceeds {self.limits.max_body_bytes} bytes")
        super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()  # type: ignore[misc]

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            raise ValueError(f"request line and headers exceed {self.limits.max_header_bytes} bytes")


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


def _address(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def tls_protocol(
    context: ssl.SSLContext | None,
    limits: ConnectionLimits = ConnectionLimits(),
    recheck: Callable[[bytes], str | None] | None = None,
) -> type[asyncio.Protocol]:
    """uvicorn's fastest available HTTP/1.1 protocol class, terminating TLS with `context` (see the mixin)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional; h11 is always there
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]
    attributes = {"ssl_context": context, "limits": limits, "recheck": staticmethod(recheck) if recheck else None}
    return type(f"TLS{Base.__name__}", (TLSExtensionMixin, Base), attributes)
