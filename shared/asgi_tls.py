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
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from shared.identity import CallerIdentity
from shared.metrics import Counter

log = logging.getLogger("mesh.tls")
tls_refusals = Counter("mesh_tls_refusals_total", "TLS handshakes refused, by OpenSSL's reason", ["reason"])

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


# Open connections and who is on the other end: the certificate is checked once, at the handshake, so when a
# certificate is revoked later, its open keep-alive connections must be found and closed (see close_where).
_open_connections: weakref.WeakKeyDictionary[TLSExtensionMixin, CallerIdentity] = weakref.WeakKeyDictionary()


def close_where(should_close: Callable[[CallerIdentity], bool]) -> int:
    """Close every open connection whose caller matches; return how many were closed."""
    doomed = [connection for connection, caller in list(_open_connections.items()) if should_close(caller)]
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
    """

    app: Any
    transport: asyncio.Transport
    ssl_context: ssl.SSLContext | None = None  # set by tls_protocol(); None only for the benchmark's plaintext
    handshake_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    _established = False
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.ssl_context is None:
            super().connection_made(transport)  # type: ignore[misc]
            return
        # start_tls() must take the connection over *now*: uvloop starts reading right after this method
        # returns (a pause_reading() here would be undone), and a ClientHello delivered to the HTTP parser
        # would be lost to TLS. So its first step runs eagerly, like a Python 3.12 eager task.
        handshake = asyncio.get_running_loop().start_tls(
            transport, self, self.ssl_context, server_side=True, ssl_handshake_timeout=self.handshake_timeout
        )
        _run_eagerly(handshake, lambda outcome: self._handshake_done(transport, outcome))

    def _handshake_done(self, raw: asyncio.Transport, outcome: asyncio.Transport | BaseException | None) -> None:
        if isinstance(outcome, ssl.SSLError):
            peer = _address(raw.get_extra_info("peername"))
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
            # The peer went away before the handshake finished (a TCP-only health probe does exactly that).
            log.debug("tls_aborted", extra={"peer": _address(raw.get_extra_info("peername")), "error": repr(outcome)})
            raw.close()
        else:
            self._tls_connection_made(outcome)

    def connection_lost(self, exc: Exception | None) -> None:
        # A connection whose handshake failed was never handed to uvicorn: nothing of its state to tear down.
        if self._established or self.ssl_context is None:
            super().connection_lost(exc)  # type: ignore[misc]

    def _tls_connection_made(self, transport: asyncio.Transport) -> None:
        extension = tls_extension(transport.get_extra_info("ssl_object"))
        self._established = True
        super().connection_made(transport)  # type: ignore[misc]
        if extension[IDENTITY_KEY] is not None:
            _open_connections[self] = extension[IDENTITY_KEY]
        self._expose(extension)

    def _expose(self, extension: dict[str, Any]) -> None:
        """Hand `extension` to the app as scope["extensions"]["tls"] on every request of this connection."""
        app = self.app

        async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": extension}
            await app(scope, receive, send)

        self.app = app_with_tls

    # httptools puts no bound on the request line and headers; these parser callbacks do. Raising here makes
    # uvicorn answer 400 and close the connection. (With h11, uvicorn's h11_max_incomplete_event_size does it.)
    def on_message_begin(self) -> None:
        self._header_bytes = 0
        super().on_message_begin()  # type: ignore[misc]

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        super().on_header(name, value)  # type: ignore[misc]

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            raise ValueError(f"request line and headers exceed {self.max_header_bytes} bytes")


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


def tls_protocol(context: ssl.SSLContext | None, max_header_bytes: int = 16 * 1024) -> type[asyncio.Protocol]:
    """uvicorn's fastest available HTTP/1.1 protocol class, terminating TLS with `context` (see the mixin)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional; h11 is always there
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]
    attributes = {"ssl_context": context, "max_header_bytes": max_header_bytes}
    return type(f"TLS{Base.__name__}", (TLSExtensionMixin, Base), attributes)
