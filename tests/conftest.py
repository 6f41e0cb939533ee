"""Fixtures: a PKI in a temporary directory, hostile identities made at run time, and the mesh as real processes.

Nothing here is mocked: the services are `python -m services` processes with real TLS on 127.0.0.1, and
the attackers build their own `ssl.SSLContext` by hand — an attacker does not use our checks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from pki import CertificateAuthority, Identity, Policy, init, load_issuer, self_signed
from pki.output import write_file
from services.local import CHAIN, ServiceProcess, chain_environments, free_ports, running, token_environment
from shared.layout import Layout
from tests.support import Credentials, Mesh, Service, signing_key, start_services

POLICY = Policy.load()


@pytest.fixture(autouse=True)
def _no_network_for_fast_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked `fast` proves its rule in-process: any socket it opens beyond the event loop's own
    AF_UNIX socketpair fails it, under `make test` as under `make test-fast` (which adds a network namespace)."""
    if request.node.get_closest_marker("fast") is None:
        return

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a fast test reached for the network: use httpx.MockTransport/ASGITransport instead")

    def only_unix(method: Any) -> Any:
        def guarded(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
            if self.family != socket.AF_UNIX:
                refuse()
            return method(self, *args, **kwargs)

        return guarded

    for name in ("connect", "connect_ex", "bind", "sendto"):
        monkeypatch.setattr(socket.socket, name, only_unix(getattr(socket.socket, name)))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session", params=["thumbprint", "spiffe-id"])
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A PKI whose allow-lists pin thumbprints, or name SPIFFE IDs: every test that uses it runs in both modes."""
    layout = Layout(tmp_path_factory.mktemp(f"pki-{request.param}"))
    init(layout, dataclasses.replace(POLICY, authorize_by=request.param))
    return layout


@pytest.fixture(scope="session")
def foreign() -> CertificateAuthority:
    """Someone else's issuing CA, with the names a careless copy of ours would have."""
    return CertificateAuthority.root("Foreign Root CA").intermediate("Foreign Issuing CA")


@pytest.fixture(scope="session")
def hostile(
    layout: Layout, foreign: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Credentials]:
    """Every kind of certificate a service must refuse at the TLS layer, plus a few it must refuse later."""
    out = tmp_path_factory.mktemp("hostile")
    ours = load_issuer(layout)
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


@pytest.fixture(scope="session")
def mesh(layout: Layout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A → B → C as three real uvicorn processes on free loopback ports; stopped even if tests fail."""
    logs = tmp_path_factory.mktemp("logs")
    processes = start_services(chain_environments(free_ports(len(CHAIN)), layout.out), logs)
    with running(processes):
        yield Mesh([Service(p) for p in processes], layout)


@pytest.fixture(scope="session")
def token_mesh(layout: Layout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A → B → C with MESH_REQUIRE_USER_TOKEN=true, and the token service — whose first signing key the tests
    know (tests/rigged_token_service.py), so that they can forge tokens that break exactly one rule."""
    logs = tmp_path_factory.mktemp("token-logs")
    key = signing_key()
    key_file = logs / "signing-key.jwk"
    write_file(key_file, json.dumps(key.as_dict(private=True)).encode(), private=True)
    *ports, token_port = free_ports(len(CHAIN) + 1)
    envs = chain_environments(ports, layout.out, token_port=token_port, MESH_REQUIRE_USER_TOKEN="true")
    environment = token_environment(token_port, layout.out, MESH_TEST_SIGNING_KEY=str(key_file))
    processes = [
        *start_services(envs, logs),
        ServiceProcess(environment, logs / f"token-service-{token_port}.log", module="tests.rigged_token_service"),
    ]
    with running(processes):
        mesh = Mesh([Service(p) for p in processes], layout)
        mesh.signing_key = key  # type: ignore[attr-defined]
        yield mesh
