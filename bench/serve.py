"""`python -m bench.serve`: one service for the benchmark — the same app and code path, optionally without TLS.

Nothing in `python -m services` or any `MESH_*` setting can reach the plaintext mode: it exists only here,
so that `make bench` can put a number on what TLS itself costs. Two extra settings, read only here:

- `BENCH_PLAINTEXT_CALLER=<certificate>`: serve plain HTTP. The caller identity the authorization layer
  sees is that certificate's, exactly as if TLS had verified it, so allow-list checks still run.
- `BENCH_TLS_MAX=1.2`: cap TLS at 1.2, on the service's listening side and on its calls to the next hop.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

from services.__main__ import run
from services.config import ServiceConfig
from shared.inbound import IDENTITY_KEY, ConnectionLimits, OneWriteResponses, RequestLimits, expose, tls_protocol
from shared.tls import LiveTLS
from shared.x509 import PeerIdentity, load_certificates


def plaintext_protocol(caller_cert: Path, limits_: ConnectionLimits) -> Callable[..., asyncio.Protocol]:
    """Plain HTTP, with `caller_cert`'s identity in the TLS extension as if a handshake had verified it."""
    leaf = load_certificates(caller_cert)[0]
    pem = caller_cert.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    extension = {"client_cert_chain": [pem], "tls_version": 0, "cipher_suite": 0}
    extension[IDENTITY_KEY] = PeerIdentity.from_certificate(leaf)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class PlaintextProtocol(RequestLimits, OneWriteResponses, HttpToolsProtocol):
        """The service's protocol minus TLS: same limits, same extension. Reachable from the bench only."""

        limits = limits_

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.app = expose(self.app, extension)

    return PlaintextProtocol


def bench_protocol(config: ServiceConfig, live: LiveTLS) -> tuple[Callable[..., asyncio.Protocol], str]:
    if os.environ.get("BENCH_TLS_MAX") == "1.2":
        for context in (live.server, live.client):
            if context is not None:
                context.maximum_version = ssl.TLSVersion.TLSv1_2
    if caller := os.environ.get("BENCH_PLAINTEXT_CALLER"):
        return plaintext_protocol(Path(caller), config.limits), "http"
    return tls_protocol(lambda: live.server, config.limits, live.recheck), "https"


def main() -> int:
    return run(bench_protocol)


if __name__ == "__main__":
    sys.exit(main())
