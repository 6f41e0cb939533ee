"""The mesh attacked for real: three uvicorn processes, real handshakes, hostile certificates.

Every refusal is proven twice: by what the caller saw (status or error class) and by what the services
logged — the refused request never reached a handler, and nothing went further down the chain.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pki import CertificateAuthority, Identity
from pki.output import write_file
from pki.revocation import first_crl
from services.local import ServiceProcess, chain_environments, running
from shared.layout import Layout
from shared.outbound import explain_transport_error
from shared.x509 import load_certificates, thumbprint
from tests.support import (
    TLS_REFUSALS,
    Credentials,
    Mesh,
    Service,
    attacker_context,
    free_ports,
    get,
    start_services,
    wait_until,
)

pytestmark = pytest.mark.e2e

SERVICES = ["service-a", "service-b", "service-c"]


def assert_refused_at_tls(mesh: Mesh, service: Service, context: ssl.SSLContext) -> Exception:
    """Proven twice: the caller's connection fails, and the service itself logged the refused handshake —
    while no service logged a decision, so no request reached any app."""
    marks = mesh.marks()
    tls_mark = service.mark()
    with pytest.raises(TLS_REFUSALS) as refused:
        get(f"{service.url}/chain", service.name, context)
    # "Connection refused" would mean nobody was listening: that proves nothing about TLS.
    assert "nothing accepts connections" not in explain_transport_error(refused.value, "", 0)
    service.assert_alive()
    wait_until(lambda: service.events_since(tls_mark, "tls_refused") != [], timeout=5)
    assert mesh.events_since(marks) == {name: [] for name in SERVICES}, "a refused handshake reached the app"
    return refused.value


def test_client_gets_three_hops_each_verifying_its_caller(mesh: Mesh) -> None:
    marks = mesh.marks()
    response = get(
        f"{mesh['service-a'].url}/chain", "service-a", attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    )
    assert response.status_code == 200, response.text
    hops = response.json()["hops"]
    assert [h["service"] for h in hops] == SERVICES
    for hop, caller in zip(hops, ["client", "service-a", "service-b"], strict=True):
        leaf = load_certificates(mesh.layout.cert(caller))[0]
        assert hop["caller"]["sha256"] == thumbprint(leaf)
        assert hop["caller"]["subject"] == f"CN={caller},O=mtls-mesh"
        assert hop["caller"]["spiffe_id"] == f"spiffe://mesh.internal/{caller}"
        assert hop["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
        assert hop["tls"]["cipher"] != "unknown"
    decisions = mesh.events_since(marks)
    assert [e["decision"] for name in SERVICES for e in decisions[name]] == ["allow"] * 3


def test_healthz_needs_a_verified_certificate_but_no_allow_list(mesh: Mesh, hostile: dict[str, Credentials]) -> None:
    service = mesh["service-c"]
    response = get(f"{service.url}/healthz", service.name, attacker_context(mesh.layout.ca_cert, hostile["stranger"]))
    health = response.json()
    assert (health["status"], health["service"]) == ("ok", "service-c")
    # What is in force: the trust anchor, and the service's own certificate.
    assert health["trust_anchors"] == [thumbprint(load_certificates(mesh.layout.ca_cert)[0])]
    assert health["certificate"]["serial"] == f"{load_certificates(mesh.layout.cert('service-c'))[0].serial_number:x}"
    with pytest.raises(TLS_REFUSALS):
        get(f"{service.url}/healthz", service.name, attacker_context(mesh.layout.ca_cert, None))


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize(
    "kind",
    [
        "no-certificate",
        "foreign-ca",
        "self-signed",
        "foreign-ca-posing-as-service-a",
        "expired",
        "not-yet-valid",
        "server-auth-only",
    ],
)
def test_refused_at_the_tls_layer(mesh: Mesh, hostile: dict[str, Credentials], service: str, kind: str) -> None:
    creds = None if kind == "no-certificate" else hostile[kind]
    assert_refused_at_tls(mesh, mesh[service], attacker_context(mesh.layout.ca_cert, creds))


@pytest.mark.parametrize("service", SERVICES)
def test_our_intermediate_ca_is_refused_at_tls(mesh: Mesh, hostile: dict[str, Credentials], service: str) -> None:
    """Our own intermediate, with its real key, presented as a client certificate: with leaf CRL checking on,
    TLS refuses it — it would need a CRL from the root, and the mesh has none."""
    assert_refused_at_tls(mesh, mesh[service], attacker_context(mesh.layout.ca_cert, hostile["our-intermediate"]))


def test_a_ca_certificate_that_passes_tls_is_still_no_caller(
    layout: Layout, hostile: dict[str, Credentials], tmp_path: Path
) -> None:
    """Give service-c a root-signed CRL too, so that TLS accepts the intermediate as a client certificate:
    the authorizer still refuses it (403, `ca_certificate`) — a CA certificate is no caller."""
    root = Identity.load(layout.ca_cert, layout.ca_key)
    root_crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root.cert.subject)
        .last_update(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
        .next_update(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .sign(root.key, hashes.SHA256())
    )
    bundle = tmp_path / "crls.pem"
    bundle.write_bytes(layout.crl.read_bytes() + root_crl.public_bytes(serialization.Encoding.PEM))
    env = {**chain_environments(free_ports(1), layout.out, names=["service-c"])[0], "MESH_CRL": str(bundle)}
    (process,) = start_services([env], tmp_path)
    with running([process]):
        service = Service(process)
        context = attacker_context(layout.ca_cert, hostile["our-intermediate"])
        response = get(f"{service.url}/chain", "service-c", context)
        assert response.status_code == 403
        assert "CA certificate" in response.json()["reason"]
        assert [e["reason"] for e in service.events_since(0, "authz")] == [response.json()["reason"]]


def test_without_a_certificate_under_cert_optional_the_app_answers_401(layout: Layout, tmp_path: Path) -> None:
    """`MESH_CLIENT_CERT=optional` (Kestrel's AllowCertificate): the handshake succeeds, the guard refuses."""
    env = {**chain_environments(free_ports(1), layout.out, names=["service-c"])[0], "MESH_CLIENT_CERT": "optional"}
    (process,) = start_services([env], tmp_path)
    with running([process]):
        service = Service(process)
        response = get(f"{service.url}/chain", "service-c", attacker_context(layout.ca_cert, None))
        assert response.status_code == 401
        assert response.json()["type"].endswith("certificate-required")
        (decision,) = service.events_since(0, "authz")
        assert decision["decision"] == "deny" and decision["reason"] == "no client certificate was presented"


@pytest.mark.parametrize("service", SERVICES)
def test_certificate_without_client_auth_eku_is_refused(
    mesh: Mesh, hostile: dict[str, Credentials], service: str
) -> None:
    """No EKU extension at all means "any use" to OpenSSL, so TLS lets it in; the authorizer does not."""
    response = get(f"{mesh[service].url}/chain", service, attacker_context(mesh.layout.ca_cert, hostile["no-eku"]))
    assert response.status_code == 403
    assert "clientAuth" in response.json()["reason"]


@pytest.mark.parametrize(
    ("caller", "service"),
    [
        ("stranger", "service-a"),
        ("stranger", "service-b"),
        ("stranger", "service-c"),
        ("client", "service-b"),
        ("client", "service-c"),
        ("service-a", "service-c"),
        ("service-c", "service-a"),
    ],
)
def test_valid_certificate_not_on_the_allow_list_gets_403(
    mesh: Mesh, hostile: dict[str, Credentials], caller: str, service: str
) -> None:
    creds = hostile["stranger"] if caller == "stranger" else mesh.credentials(caller)
    marks = mesh.marks()
    response = get(f"{mesh[service].url}/chain", service, attacker_context(mesh.layout.ca_cert, creds))

    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    sha256 = thumbprint(load_certificates(creds.cert)[0])
    assert problem["service"] == service
    assert problem["caller"]["sha256"] == sha256
    assert problem["caller"]["subject"].startswith("CN=")
    assert "not on the allow-list" in problem["reason"]
    assert "Traceback" not in response.text

    events = mesh.events_since(marks)
    assert [(e["decision"], e["caller_sha256"]) for e in events[service]] == [("deny", sha256)]
    assert all(not v for name, v in events.items() if name != service), "the refused request went further"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused(mesh: Mesh, version: ssl.TLSVersion) -> None:
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"), max_version=version)
    error = assert_refused_at_tls(mesh, mesh["service-a"], context)
    assert isinstance(error, httpx.ConnectError)


# ── the caller checks the callee ───────────────────────────────────────────────────────────────────────


def test_service_refuses_an_impostor_callee(
    layout: Layout, hostile: dict[str, Credentials], foreign: CertificateAuthority, tmp_path: Path
) -> None:
    """A's downstream is pointed at two impostors of service-b; A answers 502 and sends them nothing.

    1. a server with a foreign CA's certificate for service-b (fails the chain check);
    2. the real service-c, with our CA's certificate for service-c (fails the name check).
    Both impostors would accept A's certificate, so if A did not check, the request would reach them.
    """
    a1, a2, forged_port, c_port = free_ports(4)
    foreign_crl = tmp_path / "foreign-crl.pem"
    write_file(foreign_crl, first_crl(foreign))
    forged_b = {
        "MESH_NAME": "service-b",
        "MESH_PORT": str(forged_port),
        "MESH_PKI_DIR": str(layout.out),
        "MESH_CERT": str(hostile["foreign-service-b"].cert),
        "MESH_KEY": str(hostile["foreign-service-b"].key),
        "MESH_CRL": str(foreign_crl),  # a service needs its own CA's CRL: the impostor brings its CA's
    }
    real_c = chain_environments([c_port], layout.out, names=["service-c"])[0]

    def a_calling(port: int, downstream_port: int) -> dict[str, str]:
        return {
            **chain_environments([port], layout.out, names=["service-a"])[0],
            "MESH_DOWNSTREAM_URL": f"https://127.0.0.1:{downstream_port}",
            "MESH_DOWNSTREAM_NAME": "service-b",
        }

    impostors = start_services([forged_b, real_c], tmp_path)
    callers = start_services([a_calling(a1, forged_port), a_calling(a2, c_port)], tmp_path)
    client = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
    with running([*callers, *impostors]):
        why = ["unable to get local issuer certificate", "Hostname mismatch"]
        for caller, impostor, reason in zip(callers, impostors, why, strict=True):
            response = get(f"https://127.0.0.1:{caller.port}/chain", "service-a", client)
            assert response.status_code == 502, response.text
            problem = response.json()
            assert problem["hop"] == "service-a → service-b"
            assert "failed our check that it is service-b" in problem["reason"]
            assert reason in problem["reason"]
            assert "Traceback" not in response.text
            impostor_events = [e for e in Service(impostor).events() if e.get("event") == "authz"]
            assert impostor_events == [], f"A sent a request to the impostor {impostor.name}"
            assert "downstream_failed" in caller.output()


def test_downstream_failures_are_502_naming_the_hop(layout: Layout, tmp_path) -> None:
    """B's downstream (C) is not running: the client learns that the hop B → C failed, and why."""
    a_port, b_port, c_port = free_ports(3)
    envs = chain_environments([a_port, b_port, c_port], layout.out)[:2]  # no service-c
    client = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
    with running(processes := start_services(envs, tmp_path)):
        response = get(f"https://127.0.0.1:{a_port}/chain", "service-a", client)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["hop"] == "service-b → service-c"
    assert problem["service"] == "service-a"
    assert "service-c is not reachable" in problem["reason"]
    # The edge learns which hop failed, never where things live inside the mesh; B's log has the address.
    assert "127.0.0.1" not in response.text and str(c_port) not in response.text
    assert f"https://127.0.0.1:{c_port}" in processes[1].output()


def test_a_service_that_is_refused_downstream_reports_it(layout: Layout, tmp_path) -> None:
    """C's allow-list admits nobody: B's call is refused with 403, and the client gets 502 saying so."""
    a_port, b_port, c_port = free_ports(3)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody\n")
    envs = chain_environments([a_port, b_port, c_port], layout.out)
    envs[2]["MESH_ALLOW_LIST"] = str(empty)
    client = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
    processes = start_services(envs, tmp_path)
    with running(processes):
        response = get(f"https://127.0.0.1:{a_port}/chain", "service-a", client)
    assert response.status_code == 502
    problem = response.json()
    assert problem["hop"] == "service-b → service-c"
    assert "service-c refused service-b" in problem["reason"]
    assert "not on the allow-list" in problem["reason"]
    c_events = [e for e in Service(processes[2]).events() if e.get("event") == "authz"]
    assert [e["decision"] for e in c_events] == ["deny"]


def test_keep_alive_reuses_the_connection(mesh: Mesh) -> None:
    """One handshake, many requests: the identity is computed per connection and still right each time."""
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    with httpx.Client(verify=context, timeout=10) as client:
        streams = set()
        for _ in range(5):
            response = client.get(f"{mesh['service-a'].url}/chain", extensions={"sni_hostname": "service-a"})
            assert response.status_code == 200
            streams.add(id(response.extensions["network_stream"]))
    assert len(streams) == 1


def answer_and_its_records(port: int, context: ssl.SSLContext, server_name: str, request: bytes) -> tuple[bytes, int]:
    """`request` sent on a new TLS connection: the answer, and how many TLS records it came in (read off the wire)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(request)
        sock.sendall(outgoing.read())  # our Finished, then the request
        wire, answer = b"", b""
        while not (b"\r\n\r\n" in answer and answer.endswith(b"}")):  # a JSON answer, kept alive: no close
            chunk = sock.recv(65536)
            assert chunk, f"the service closed the connection after {answer!r}"
            wire += chunk
            incoming.write(chunk)
            try:
                while data := tls.read(65536):
                    answer += data
            except ssl.SSLWantReadError:
                pass
    records, at = 0, 0
    while at < len(wire):  # each record: type, version (2 bytes), length (2 bytes), then the sealed payload
        records, at = records + 1, at + 5 + int.from_bytes(wire[at + 3 : at + 5], "big")
    return answer, records


def test_an_answer_leaves_in_one_tls_record(mesh: Mesh) -> None:
    """uvicorn writes a response's head and its body separately; the services send both in one write
    (shared/inbound/onewrite.py), so one TLS record to seal, one to open, one wake-up for the caller."""
    service = mesh["service-c"]
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    request = b"GET /healthz HTTP/1.1\r\nHost: service-c\r\n\r\n"
    answer, records = answer_and_its_records(service.port, context, service.name, request)
    assert answer.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer
    assert records == 1


def test_process_runner_reports_a_service_that_cannot_start(layout: Layout, tmp_path) -> None:
    env = chain_environments(free_ports(1), layout.out, names=["service-a"])[0]
    env["MESH_ALLOW_LIST"] = str(tmp_path / "missing.txt")
    process = ServiceProcess(env, tmp_path / "a.log")
    with pytest.raises(RuntimeError, match=r"missing\.txt: allow-list not found"), running([process]):
        pass
