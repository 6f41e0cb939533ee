"""httpx on a network backend of ours: the one place that reaches into httpx, with the version it was made for.

httpx has no public way to choose httpcore's network backend (the part that opens connections), and both of
our uses need one: the services' calls on the event loop's own TLS transport (shared.outbound.nativetls), and
the CLI client's, which checks every callee once its handshake completes (shared.outbound.callee). httpx keeps
its httpcore pool in the private `_pool` of each transport; we rebuild it the way httpx does, with our backend.
pyproject.toml pins httpx below the next minor, and a version this was not made for stops here, not later.
"""

from __future__ import annotations

import ssl
from typing import TypeVar

import httpcore
import httpx

__all__ = ["HTTPX_MINOR", "on_backend"]

HTTPX_MINOR = "0.28"  # the httpx whose `_pool` this reaches into; pyproject.toml pins the same
Transport = TypeVar("Transport", httpx.HTTPTransport, httpx.AsyncHTTPTransport)


def on_backend(
    transport: Transport,
    context: ssl.SSLContext,
    limits: httpx.Limits,
    backend: httpcore.NetworkBackend | httpcore.AsyncNetworkBackend,
) -> Transport:
    """`transport`, its connection pool rebuilt on `backend`: what httpx would build, with our backend in it."""
    if not httpx.__version__.startswith(HTTPX_MINOR + "."):
        raise RuntimeError(
            f"httpx {httpx.__version__} is installed; shared/outbound/pool.py reaches into httpx {HTTPX_MINOR}'s "
            "private `_pool`: re-check it against the new httpx, then move HTTPX_MINOR and the pin in pyproject.toml"
        )
    pool = httpcore.AsyncConnectionPool if isinstance(transport, httpx.AsyncHTTPTransport) else httpcore.ConnectionPool
    transport._pool = pool(  # type: ignore[assignment]
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,  # type: ignore[arg-type]
    )
    return transport
