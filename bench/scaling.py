"""How the cost grows: a CRL of 10 / 10,000 / 100,000 revoked serials, an allow-list of as many entries.

For each size: the bare mutual handshake as a running service makes it with that CRL in force (LiveTLS's contexts,
then its recheck of the peer on both sides: a set lookup), and — what it was before, and what a standalone context
such as the CLI client's still does — with the CRL loaded into OpenSSL, which verifies it on every handshake; the
time a running service takes to reload it (read, check, refuse-if-older, build its contexts and its revoked set),
the authorization decision against an allow-list of that size, and the allow-list's reload. The chain's length is
measured in bench.bench itself (3 and 6 hops, side by side).
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import os
import random
import shutil
import ssl
import statistics
import threading
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from bench.handshake import bare_handshake_ms
from pki import load_issuer
from services.local import ServiceProcess, chain_environments, free_ports, running
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


def crl_scaling(
    layout: Layout, scratch: Path, sizes: Sequence[int] = SIZES, repeats: int = 3, runs: int = 100
) -> dict[str, Any]:
    """Per size: the handshake (median over the repeats) and the reload; and, measured in each repeat with the
    sizes interleaved, the handshake with the largest CRL ÷ with the smallest (`repeated`, for its spread)."""
    results: dict[str, Any] = {}
    pairs, openssl_pairs = {}, {}
    for size in sizes:
        out = scratch / f"crl-{size}"
        shutil.copytree(layout.out, out)
        sized = Layout(out)
        crl_with(layout, size, sized.crl)
        live, caller = tls.LiveTLS(sized.material("service-b")), tls.LiveTLS(sized.material("service-a"))
        pairs[size] = (live.server, caller.client, rechecked_by(caller, live))
        openssl_pairs[size] = (
            tls.server_context(sized.material("service-b")),
            tls.client_context(sized.material("service-a")),
        )
        reloads = []
        for _ in range(3):
            start = time.perf_counter()
            live.reload()
            reloads.append((time.perf_counter() - start) * 1000)
        results[str(size)] = {"reload_ms": statistics.median(reloads)}
    handshakes: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(repeats):
        for size in sizes:
            server, client, check = pairs[size]
            handshakes[size].append(bare_handshake_ms(server, client, "service-b", runs=runs, check=check))
    for size in sizes:
        results[str(size)]["handshake_ms"] = statistics.median(handshakes[size])
        results[str(size)]["openssl_crl_handshake_ms"] = bare_handshake_ms(*openssl_pairs[size], "service-b", runs=runs)
    largest, smallest = handshakes[max(sizes)], handshakes[min(sizes)]
    results["repeated"] = {"handshake_ratio": [a / b for a, b in zip(largest, smallest, strict=True)]}
    return results


def rechecked_by(caller: tls.LiveTLS, callee: tls.LiveTLS) -> Callable[[ssl.SSLObject, ssl.SSLObject], None]:
    """Both sides' recheck of a completed handshake, as the services run it before reading a byte."""

    def check(client: ssl.SSLObject, server: ssl.SSLObject) -> None:
        refused = caller.recheck(client) or callee.recheck(server)
        assert refused is None, refused

    return check


def allow_list_scaling(
    layout: Layout, scratch: Path, sizes: Sequence[int] = SIZES, runs: int = 100_000
) -> dict[str, dict[str, float]]:
    caller = PeerIdentity.from_certificate(load_certificates(layout.cert("service-a"))[0])
    stranger = PeerIdentity.from_certificate(load_certificates(layout.cert("service-c"))[0])  # on no list here
    live, results = tls.LiveTLS(layout.material("service-b")), {}
    for size in sizes:
        path = scratch / f"allow-{size}.txt"
        lines = [f"{i:064x}  # filler {i}" for i in range(size - 1)] + [f"{caller.sha256}  # service-a"]
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)
        loads = []
        for _ in range(3):
            start = time.perf_counter()
            allow = AllowList.load(path)
            loads.append((time.perf_counter() - start) * 1000)
        policy = service_policy(allow, live)
        # An allowed and a refused caller in turn: a guard's lookups for one caller are remembered (shared.packed).
        callers = itertools.cycle([caller, stranger])
        decision_us = min(timeit.repeat(lambda: policy(next(callers)), number=runs, repeat=3)) / runs * 1e6  # noqa: B023
        results[str(size)] = {"authz_us": decision_us, "reload_ms": statistics.median(loads)}
    return results


def p99_during_reloads(layout: Layout, scratch: Path, entries: int, repeats: int, seconds: float) -> dict[str, Any]:
    """p99 of a stream of requests to a service while its CRL, or its allow-list, of `entries` entries is replaced
    every second, ÷ p99 of the same stream while nothing changes: phases interleaved, `repeats` times.

    The service (service-a alone: the reload happens where the request is served) watches its files every 0.25 s.
    Every replacement is a newer CRL (a service refuses an older one) or a changed allow-list, written beforehand
    and renamed into place, so the bench spends nothing on it while it measures."""
    out = scratch / "reloads"
    shutil.copytree(layout.out, out)
    sized = Layout(out)
    client = PeerIdentity.from_certificate(load_certificates(sized.cert("client"))[0])
    allow = sized.allow_list("service-a")
    filler = "".join(f"{i:064x}  # filler {i}\n" for i in range(entries))
    period = min(1.0, seconds / 2)  # a replacement every second (twice a phase at least, for short runs)
    count = repeats * math.ceil(seconds / period) + 1
    versions = {
        "allow_list": [allow.read_text() + f"# version {n}\n" + filler for n in range(count)],
        "crl": crls_numbered(sized, entries, count),
    }
    targets = {"allow_list": allow, "crl": sized.crl}
    staged: dict[str, list[Path]] = {kind: [] for kind in versions}
    for kind, contents in versions.items():
        for n, content in enumerate(contents):
            staged[kind].append(out / f"staged-{kind}-{n}")
            staged[kind][-1].write_bytes(content if isinstance(content, bytes) else content.encode())
            staged[kind][-1].chmod(0o644)
        os.replace(staged[kind].pop(0), targets[kind])  # in force when the service starts
    [port] = free_ports(1)
    [env] = chain_environments([port], sized.out, names=("service-a",), MESH_LOG_LEVEL="info")
    env["MESH_RELOAD_INTERVAL"] = "0.25"
    p99s: dict[str, list[float]] = {"quiet": [], "crl": [], "allow_list": []}
    context = tls.client_context(sized.material("client"))
    with running([ServiceProcess(env, scratch / "reloads.log")]), httpx.Client(verify=context, timeout=10) as http:
        url = f"https://127.0.0.1:{port}/chain"
        http.get(url, extensions={"sni_hostname": "service-a"})
        assert client.sha256 in allow.read_text()
        for _ in range(repeats):
            for phase in random.sample(list(p99s), len(p99s)):
                stop = threading.Event()
                pending, target = staged.get(phase, []), targets.get(phase)
                renamer = threading.Thread(target=replace_every, args=(period, pending, target, stop))
                renamer.start()
                latencies = []
                deadline = time.perf_counter() + seconds
                try:
                    while time.perf_counter() < deadline:
                        start = time.perf_counter()
                        response = http.get(url, extensions={"sni_hostname": "service-a"})
                        assert response.status_code == 200, response.text
                        latencies.append((time.perf_counter() - start) * 1000)
                finally:
                    stop.set()
                    renamer.join()
                p99s[phase].append(sorted(latencies)[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))])
    log = (scratch / "reloads.log").read_text()
    return {
        kind: {"repeated": {"p99_during_reload_ratio": [r / q for r, q in zip(p99s[kind], p99s["quiet"], strict=True)]}}
        | {
            "p99_quiet_ms": statistics.median(p99s["quiet"]),
            "p99_during_reload_ms": statistics.median(p99s[kind]),
            # Proof that they happened: the service's own word for each reload it took (none may be refused).
            "reloads_taken": sum('"reloaded"' in line and str(targets[kind]) in line for line in log.splitlines()),
            "reloads_refused": log.count('"reload_refused"'),
        }
        for kind in ("crl", "allow_list")
    }


def replace_every(period: float, staged: list[Path], target: Path | None, stop: threading.Event) -> None:
    while staged and target is not None and not stop.wait(period):
        os.replace(staged.pop(0), target)


def crls_numbered(layout: Layout, entries: int, count: int) -> list[bytes]:
    """`count` CRLs of `entries` random serials, each one number newer than the one before."""
    issuer, now = load_issuer(layout), dt.datetime.now(dt.UTC)
    revoked = [
        x509.RevokedCertificateBuilder().serial_number(x509.random_serial_number()).revocation_date(now).build()
        for _ in range(entries)
    ]
    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
        .issuer_name(issuer.cert.subject)
        .last_update(now - dt.timedelta(minutes=1))
        .next_update(now + dt.timedelta(days=1))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    )
    return [
        builder.add_extension(x509.CRLNumber(2 * 10**6 + n), critical=False)
        .sign(issuer.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        for n in range(count)
    ]
