"""Fixtures: a PKI in a temporary directory, hostile identities made at run time, and the mesh as real processes.

Nothing here is mocked: the services are `python -m services` processes with real TLS on 127.0.0.1, and
the attackers build their own `ssl.SSLContext` by hand — an attacker does not use our checks.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pki import CertificateAuthority, Identity, Policy, init, load_issuer, self_signed
from services.local import CHAIN, ServiceProcess, chain_environments, free_ports, running
from shared.layout import Layout

POLICY = Policy.load()
# How a refusal during the handshake looks to an httpx client under asyncio: no TLS alert, the connection
# just closes — during the handshake (ConnectError) or, with TLS 1.3, at the first read.
TLS_REFUSALS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("pki"))
    init(layout)
    return layout


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def hostile(layout: Layout, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Credentials]:
    """Every kind of certificate a service must refuse at the TLS layer, plus a few it must refuse later."""
    out = tmp_path_factory.mktemp("hostile")
    ours = load_issuer(layout)
    foreign = CertificateAuthority.root("Foreign Root CA").intermediate("Foreign Issuing CA")
    now = dt.datetime.now(dt.UTC)
    client_only = {"usages": ["client"], "uris": [POLICY.spiffe_id("intruder")]}
    identities: dict[str, Identity] = {
        "foreign-ca": foreign.issue("intruder", **client_only),
        # A perfect copy of service-a's subject and SANs, signed by someone else's CA.
        "foreign-ca-posing-as-service-a": foreign.issue(
            "service-a", dns=["service-a", "localhost"], ips=["127.0.0.1"], uris=[POLICY.spiffe_id("service-a")]
        ),
        "self-signed": self_signed("service-a", dns=["service-a"]),
        "expired": ours.issue(
            "expired", **client_only, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        ),
        "not-yet-valid": ours.issue(
            "early", **client_only, not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)
        ),
        "server-auth-only": ours.issue("server-only", usages=["server"], uris=[POLICY.spiffe_id("server-only")]),
        # Our own intermediate CA, with its real key, presented as if it were a client certificate.
        "our-intermediate": Identity(ours.cert, ours.key),
        # Issued by our CA, so TLS accepts it; on no allow-list, so every service must answer 403.
        "stranger": ours.issue("stranger", **client_only),
        # Our CA, but without clientAuth in the EKU... (TLS refuses those) — and one with no EKU at all.
        "no-eku": ours.issue("no-eku", usages=[], uris=[POLICY.spiffe_id("no-eku")]),
        # For the impostor-callee tests: service-b's name, a foreign CA's signature.
        "foreign-service-b": foreign.issue(
            "service-b", dns=["service-b", "localhost"], ips=["127.0.0.1"], uris=[POLICY.spiffe_id("service-b")]
        ),
    }
    result = {}
    for name, identity in identities.items():
        cert, key = identity.write(out, name)
        result[name] = Credentials(cert, key)
    return result


def attacker_context(
    ca: Path, creds: Credentials | None, *, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A client context built by hand, as an attacker would: no checks on what it presents."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    if creds is not None:
        context.load_cert_chain(creds.cert, creds.key)
    if max_version is not None:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 otherwise refuses TLS < 1.2 itself
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = max_version
    return context


def get(url: str, server_name: str, context: ssl.SSLContext) -> httpx.Response:
    with httpx.Client(verify=context, timeout=10) as client:
        return client.get(url, extensions={"sni_hostname": server_name})


class Service:
    """A running service, with its log read back as JSON events."""

    def __init__(self, process: ServiceProcess) -> None:
        self.process = process
        self.name, self.port = process.name, process.port
        self.url = f"https://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.process.output().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def mark(self) -> int:
        return len(self.events())

    def events_since(self, mark: int, event: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events()[mark:] if event is None or e.get("event") == event]

    def assert_alive(self) -> None:
        assert self.process.process is not None and self.process.process.poll() is None, f"{self.name} died"


class Mesh:
    def __init__(self, services: list[Service], layout: Layout) -> None:
        self.services = {s.name: s for s in services}
        self.layout = layout

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def marks(self) -> dict[str, int]:
        return {name: s.mark() for name, s in self.services.items()}

    def events_since(self, marks: dict[str, int], event: str = "authz") -> dict[str, list[dict[str, Any]]]:
        return {name: s.events_since(marks[name], event) for name, s in self.services.items()}

    def credentials(self, name: str) -> Credentials:
        return Credentials(self.layout.cert(name), self.layout.key(name))


def start_services(envs: list[dict[str, str]], logs: Path) -> list[ServiceProcess]:
    return [ServiceProcess(env, logs / f"{env['MESH_NAME']}-{env['MESH_PORT']}.log") for env in envs]


@pytest.fixture(scope="session")
def mesh(layout: Layout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A → B → C as three real uvicorn processes on free loopback ports; stopped even if tests fail."""
    logs = tmp_path_factory.mktemp("logs")
    processes = start_services(chain_environments(free_ports(len(CHAIN)), layout.out), logs)
    with running(processes):
        yield Mesh([Service(p) for p in processes], layout)
