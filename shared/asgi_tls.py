"""Give the application the certificate the caller presented — uvicorn does not.

The ASGI spec defines a TLS extension (`scope["extensions"]["tls"]`) carrying the client's certificate
chain, but no uvicorn release fills it, and an ASGI middleware cannot reach the socket to do it. So we
subclass uvicorn's HTTP protocol: when a connection is made (after the handshake, so the certificate is
already verified), we read the peer certificate once, work out the caller's identity once, and hand the
same extension to every request on that connection. Keep-alive requests therefore cost no certificate work.

This touches one uvicorn internal, the per-connection `self.app`; it is kept tiny and is covered by the
end-to-end tests, which fail loudly if a uvicorn upgrade changes it. When uvicorn implements the spec,
`shared.authz` keeps working from `client_cert_chain` alone.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Callable
from typing import Any

from shared.identity import CallerIdentity

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
    """Mixed into a uvicorn HTTP protocol class; see the module docstring."""

    app: Any
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:  # plain HTTP: nothing to add
            return
        extension = tls_extension(ssl_object)
        if extension[IDENTITY_KEY] is not None:
            _open_connections[self] = extension[IDENTITY_KEY]
        app = self.app

        async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": extension}
            await app(scope, receive, send)

        self.app = app_with_tls


def tls_protocol() -> type[asyncio.Protocol]:
    """uvicorn's fastest available HTTP/1.1 protocol class, with the TLS extension added."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional; h11 is always there
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]
    return type(f"TLS{Base.__name__}", (TLSExtensionMixin, Base), {})
