"""The caller's half of mutual authentication: the callee must be the identity we meant to call.

TLS already checked that the callee's certificate chains to our root and carries the DNS name we dialled
(`check_hostname`). That name is only as good as the CA's care in issuing it, so after the handshake — and
before a single byte of the request is sent — the callee's certificate must also be the X509-SVID we
expect, checked with the same `Authorizer` type the callee applies to us (go-spiffe's
`MTLSClientConfig(svid, bundle, authorizer)`)::

    check = callee_check(authorize_id(SpiffeId.parse("spiffe://mesh.internal/service-b")))
    transport = nativetls.transport(context, limits, check)      # the services (async)
    transport = sync_transport(context, check)                    # the CLI client

A refused callee gets no request; the caller's error names the rule.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from typing import Any

import httpcore
import httpx

from shared.authz.rules import Authorizer
from shared.outbound.pool import on_backend
from shared.tls.live import Recheck
from shared.x509.identity import PeerIdentity

__all__ = ["CalleeCheck", "CalleeRefused", "callee_check", "sync_transport"]

# Raises CalleeRefused, or returns: the callee on this TLS connection is the one we meant.
CalleeCheck = Callable[[ssl.SSLObject], None]


class CalleeRefused(Exception):
    """The callee's certificate is genuine but not the identity we meant to call; the message says why."""


def callee_check(authorizer: Authorizer, recheck: Recheck | None = None) -> CalleeCheck:
    """`authorizer` decides who the callee must be; `recheck` (a service's LiveTLS.recheck) checks it again
    against the trust in force when the handshake completes, which may be newer than the context it began
    with: a callee revoked, or its CA retired, while our handshake with it was in flight is refused."""

    def check(ssl_object: ssl.SSLObject) -> None:
        der = ssl_object.getpeercert(True)  # positional: httpcore's blocking stream hands us the raw _SSLSocket
        if not der:
            raise CalleeRefused("the callee presented no certificate")
        if recheck is not None and (reason := recheck(ssl_object)):
            raise CalleeRefused(reason)
        decision = authorizer(PeerIdentity.from_der(der))
        if not decision.allowed:
            raise CalleeRefused(decision.reason)

    return check


def refuse_unless(check: CalleeCheck, ssl_object: ssl.SSLObject, close: Callable[[], Any]) -> None:
    """Run `check`; on refusal close the connection and raise httpcore's ConnectError (httpx: ConnectError)."""
    try:
        check(ssl_object)
    except CalleeRefused as refused:
        close()
        raise httpcore.ConnectError(f"callee refused: {refused}") from refused


class _CheckedStream(httpcore.NetworkStream):
    """httpcore's own blocking stream, checked right after its TLS handshake."""

    def __init__(self, stream: httpcore.NetworkStream, check: CalleeCheck) -> None:
        self._stream, self._check = stream, check

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, timeout)
        refuse_unless(self._check, tls.get_extra_info("ssl_object"), tls.close)
        return tls

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _CheckedBackend(httpcore.SyncBackend):
    def __init__(self, check: CalleeCheck) -> None:
        self._check = check

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _CheckedStream(stream, self._check)


def sync_transport(context: ssl.SSLContext, check: CalleeCheck) -> httpx.HTTPTransport:
    """httpx's blocking transport, its pool on a backend that checks every callee (for the CLI client)."""
    limits = httpx.Limits()  # httpx's defaults, as `httpx.HTTPTransport(verify=context)` has them
    return on_backend(httpx.HTTPTransport(verify=context, limits=limits), context, limits, _CheckedBackend(check))
