"""How the cost grows: a CRL of 10 / 10,000 / 100,000 revoked serials, an allow-list of as many entries.

For each size: the bare mutual handshake with that CRL loaded (OpenSSL looks the peer up in it), the time a
running service takes to reload it (read, check, refuse-if-older, load into its contexts), the authorization
decision against an allow-list of that size, and the allow-list's reload. The chain's length is measured in
bench.bench itself (3 and 6 hops, side by side).
"""

from __future__ import annotations

import datetime as dt
import shutil
import statistics
import time
import timeit
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from bench.handshake import bare_handshake_ms
from pki import load_issuer
from services.wiring import service_policy
from shared import tls
from shared.authz import AllowList
from shared.layout import Layout
from shared.x509 import PeerIdentity, load_certificates

SIZES = (10, 10_000, 100_000)


def crl_with(layout: Layout, entries: int, path: Path) -> None:
    """A CRL signed by our intermediate, revoking `entries` random serials (none of ours)."""
    issuer, now = load_issuer(layout), dt.datetime.now(dt.UTC)
    revoked = [
        x509.RevokedCertificateBuilder().serial_number(x509.random_serial_number()).revocation_date(now).build()
        for _ in range(entries)
    ]
    crl = (
        x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
        .issuer_name(issuer.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(10**6 + entries), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def crl_scaling(layout: Layout, scratch: Path) -> dict[str, dict[str, float]]:
    results = {}
    for size in SIZES:
        out = scratch / f"crl-{size}"
        shutil.copytree(layout.out, out)
        sized = Layout(out)
        crl_with(layout, size, sized.crl)
        server = tls.server_context(sized.material("service-b"))
        client = tls.client_context(sized.material("service-a"))
        live = tls.LiveTLS(sized.material("service-b"))
        reloads = []
        for _ in range(3):
            start = time.perf_counter()
            live.reload()
            reloads.append((time.perf_counter() - start) * 1000)
        results[str(size)] = {
            "handshake_ms": bare_handshake_ms(server, client, "service-b", runs=100),
            "reload_ms": statistics.median(reloads),
        }
    return results


def allow_list_scaling(layout: Layout, scratch: Path) -> dict[str, dict[str, float]]:
    caller = PeerIdentity.from_certificate(load_certificates(layout.cert("service-a"))[0])
    results = {}
    for size in SIZES:
        path = scratch / f"allow-{size}.txt"
        lines = [f"{i:064x}  # filler {i}" for i in range(size - 1)] + [f"{caller.sha256}  # service-a"]
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)
        loads = []
        for _ in range(3):
            start = time.perf_counter()
            allow = AllowList.load(path)
            loads.append((time.perf_counter() - start) * 1000)
        policy = service_policy(allow)
        runs = 100_000
        decision_us = min(timeit.repeat(lambda: policy(caller), number=runs, repeat=3)) / runs * 1e6  # noqa: B023
        results[str(size)] = {"authz_us": decision_us, "reload_ms": statistics.median(loads)}
    return results
