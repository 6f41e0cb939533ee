"""The edges of the trust lifecycle (issue #20, items 1 and 4), attacked against real processes.

1. A handshake that straddles a trust change: the attacker begins a TLS 1.3 handshake with the client's key,
   holds back its last flight (client Certificate, CertificateVerify, Finished) until the service has taken
   in the change, then finishes and sends a request. The context the handshake began with still trusted it;
   the trust in force when it completes must not. The same from the calling side: a callee whose handshake
   with us straddles its revocation gets no request.
2. A connection that outlives the trust its certificate had (found after issue #25): the attacker keeps a
   connection open past its certificate's expiry, when no file changes and no reload closes it. The service's
   clock must close it, and a request that comes first must get no further than the guard. The same for a
   callee's certificate that expires under the caller's pooled connection.
4. A CA recognised by its key, not its name: `pki init --force` (a new CA, the same names) under a running
   mesh is taken whole — the old CA's open connections are cut, its certificates refused, the new ones work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pki import CertificateAuthority, Policy, init, load_issuer, revoke, write_crl
from pki.identities import service_sans
from pki.output import write_file
from services.local import chain_environments, running
from shared.layout import Layout
from shared.tls import LiveTLS
from shared.x509 import MaterialError, PeerIdentity, load_certificates, thumbprint
from tests.support import (
    TLS_REFUSALS,
    Credentials,
    Mesh,
    Service,
    attacker_context,
    free_ports,
    get,
    identity_of,
    start_services,
    wait_until,
)

POLICY = dataclasses.replace(Policy.load(), authorize_by="spiffe-id")  # so that a second CA's client is listed
RELOAD = {"MESH_RELOAD_INTERVAL": "0.25"}
REQUEST = b"GET /chain HTTP/1.1\r\nHost: service-a\r\nConnection: close\r\n\r\n"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "pki")
    init(layout, POLICY)
    return layout


@contextmanager
def a_and_b(layout: Layout, logs: Path, **env: str) -> Iterator[Mesh]:
    """service-a calling service-b, on this PKI, re-reading their files every 0.25 s."""
    envs = chain_environments(free_ports(2), layout.out, names=["service-a", "service-b"], **{**RELOAD, **env})
    processes = start_services(envs, logs)
    with running(processes):
        yield Mesh([Service(p) for p in processes], layout)


def reloaded(service: Service, mark: int, file: str) -> bool:
    """Has `service` taken in a change of `file` since `mark` (its "reloaded" log line)?"""
    return any(file in str(e.get("files")) for e in service.events_since(mark, "reloaded"))


class HeldBackHandshake:
    """A TLS 1.3 client on a raw socket that runs the handshake up to its last flight and keeps that back."""

    def __init__(self, port: int, context: ssl.SSLContext, server_name: str) -> None:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        while True:
            try:
                self.tls.do_handshake()  # done, for the client, once its last flight is written (to our buffer)
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())  # the ClientHello
                if not (flight := self.sock.recv(65536)):  # the server's flight, up to its Finished
                    raise AssertionError("the server closed the connection during the handshake") from None
                self.incoming.write(flight)
        self.last_flight = self.outgoing.read()
        assert self.last_flight, "the client's Certificate, CertificateVerify and Finished are held back"

    def finish_and_send(self, request: bytes) -> bytes:
        """Send the held-back flight and `request` together; return whatever the server answers, to its end."""
        self.tls.write(request)
        answer = b""
        try:
            self.sock.sendall(self.last_flight + self.outgoing.read())
            while chunk := self.sock.recv(65536):
                self.incoming.write(chunk)
                try:
                    while data := self.tls.read(65536):
                        answer += data
                except ssl.SSLWantReadError:
                    continue
                break  # read() gave b"": the server's close_notify
        except (ssl.SSLError, OSError):
            pass  # reset or torn down: the server said nothing more
        finally:
            self.sock.close()
        return answer


def straddled_request(service: Service, context: ssl.SSLContext, change: Callable[[], object], file: str) -> bytes:
    """Begin a handshake with `context`, make `change`, wait until `service` took it in, finish, send a request."""
    attacker = HeldBackHandshake(service.port, context, "service-a")
    mark = service.mark()
    change()
    wait_until(lambda: reloaded(service, mark, file), describe=lambda: str(service.events_since(mark)))
    return attacker.finish_and_send(REQUEST)


def assert_nothing_got_through(mesh: Mesh, marks: dict[str, int], answer: bytes) -> None:
    assert answer == b"", f"the service answered a peer it no longer trusts: {answer[:200]!r}"
    assert mesh.events_since(marks) == {"service-a": [], "service-b": []}, "no request reached any app"


# ── 1. a handshake that straddles a trust change ─────────────────────────────────────────────────────────────


@pytest.mark.e2e
def test_a_handshake_that_straddles_a_revocation_is_refused(layout: Layout, tmp_path: Path) -> None:
    with a_and_b(layout, tmp_path) as mesh:
        service = mesh["service-a"]
        context = attacker_context(layout.ca_cert, mesh.credentials("client"))
        assert (
            HeldBackHandshake(service.port, context, "service-a").finish_and_send(REQUEST).startswith(b"HTTP/1.1 200")
        ), "held back and then finished, without a trust change, the handshake works"
        marks = mesh.marks()
        answer = straddled_request(service, context, lambda: revoke(layout, "client", "key-compromise"), "crl.pem")
        assert_nothing_got_through(mesh, marks, answer)
        refusals = service.events_since(marks["service-a"], "tls_refused")
        assert [e["reason"] for e in refusals] == ["certificate revoked"]


def trust_a_second_ca(layout: Layout, tmp_path: Path) -> tuple[Credentials, bytes]:
    """A second CA trusted beside ours (its root in ca.crt, its intermediate's CRL in crl.pem): a client of it,
    and ca.crt as it was without it, to write back when the test takes it out."""
    second_root = CertificateAuthority.root("Second Root CA")
    second = second_root.intermediate("Second Issuing CA")
    client = Credentials(*second.issue("client", usages=["client"], uris=[POLICY.spiffe_id("client")]).write(tmp_path))
    ours = layout.ca_cert.read_bytes()
    write_file(layout.ca_cert, ours + second_root.cert_pem())
    write_file(layout.crl, layout.crl.read_bytes() + empty_crl(second))
    return client, ours


@pytest.mark.e2e
def test_a_handshake_that_straddles_the_removal_of_its_ca_is_refused(layout: Layout, tmp_path: Path) -> None:
    """A second CA is trusted (its root in ca.crt, its intermediate's CRL in crl.pem) and then taken out of
    ca.crt only: its handshake in flight is refused, and its open keep-alive connection is closed."""
    client, ours = trust_a_second_ca(layout, tmp_path)
    with a_and_b(layout, tmp_path) as mesh:
        service = mesh["service-a"]
        context = attacker_context(layout.ca_cert, client)
        with httpx.Client(verify=context, timeout=5) as open_connection:
            url = f"{service.url}/chain"
            assert open_connection.get(url, extensions={"sni_hostname": "service-a"}).status_code == 200
            marks = mesh.marks()
            answer = straddled_request(service, context, lambda: write_file(layout.ca_cert, ours), "ca.crt")
            assert_nothing_got_through(mesh, marks, answer)
            with pytest.raises(TLS_REFUSALS):  # its keep-alive connection was cut at the reload
                open_connection.get(url, extensions={"sni_hostname": "service-a"})
        reasons = [e["reason"] for e in service.events_since(marks["service-a"], "tls_refused")]
        assert reasons and "is no longer trusted: it is not in ca.crt" in reasons[0]
        assert any(e.get("revoked_connections_closed") == 1 for e in service.events_since(marks["service-a"]))


class KeptAlive:
    """An HTTP/1.1 connection kept open over TLS 1.2, resuming `session` if it can."""

    def __init__(self, port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 resumes only with a ticket: none is issued
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.tls = context.wrap_socket(raw, server_hostname="service-a", session=session)

    def get(self) -> int | None:
        """The status of one GET /chain on it, or None once the service has closed it."""
        try:
            self.tls.sendall(REQUEST.replace(b"Connection: close", b"Connection: keep-alive"))
            response = http.client.HTTPResponse(self.tls)  # type: ignore[arg-type]
            response.begin()
            response.read()
            return response.status
        except (ssl.SSLError, OSError, http.client.HTTPException):
            return None

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self.tls.unwrap()  # a clean close_notify both ways: the service keeps the session to resume
        self.tls.close()


@pytest.mark.e2e
def test_a_resumed_session_of_a_ca_taken_out_of_ca_crt_is_closed(layout: Layout, tmp_path: Path) -> None:
    """A resumed TLS 1.2 session shows no chain, so no CA to check against ca.crt. When a CA leaves ca.crt, the
    connections open on a resumed session are closed with the rest. (The review's attack: before, a client of the
    removed CA that resumed its session and kept that connection busy went on being served.)"""
    client, ours = trust_a_second_ca(layout, tmp_path)
    with a_and_b(layout, tmp_path) as mesh:
        service = mesh["service-a"]
        context = attacker_context(layout.ca_cert, client)
        first = KeptAlive(service.port, context)
        assert first.get() == 200
        session = first.tls.session
        first.close()
        resumed = KeptAlive(service.port, context, session)
        try:
            assert resumed.tls.session_reused and resumed.get() == 200
            marks = mesh.marks()
            write_file(layout.ca_cert, ours)
            wait_until(lambda: reloaded(service, marks["service-a"], "ca.crt"))
            assert resumed.get() is None  # closed at the reload
        finally:
            resumed.close()
        assert mesh.events_since(marks) == {"service-a": [], "service-b": []}, "no request reached any app"
        [reload] = service.events_since(marks["service-a"], "reloaded")
        assert reload["revoked_connections_closed"] >= 1


@pytest.mark.e2e
def test_a_callee_whose_handshake_straddles_its_revocation_gets_no_request(layout: Layout, tmp_path: Path) -> None:
    """service-a calls "service-b" — the real service-b key, in an attacker's hands — which delays its side of
    the handshake until service-b is revoked and A has taken the CRL in: A must not send it the request."""
    listener = socket.create_server(("127.0.0.1", 0))
    (port,) = free_ports(1)
    env = chain_environments([port], layout.out, names=["service-a"], **RELOAD)[0]
    env |= {
        "MESH_DOWNSTREAM_URL": f"https://127.0.0.1:{listener.getsockname()[1]}",
        "MESH_DOWNSTREAM_NAME": "service-b",
    }
    impostor = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    impostor.load_cert_chain(layout.cert("service-b"), layout.key("service-b"))
    (process,) = start_services([env], tmp_path)
    with running([process]), listener:
        service = Service(process)
        answers: list[httpx.Response] = []
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        calling = threading.Thread(target=lambda: answers.append(get(f"{service.url}/chain", "service-a", context)))
        calling.start()
        listener.settimeout(10)
        connection, _ = listener.accept()  # A's ClientHello waits in the socket: no ServerHello yet
        mark = service.mark()
        revoke(layout, "service-b", "key-compromise")
        wait_until(lambda: reloaded(service, mark, "crl.pem"))
        received = b""
        try:
            with impostor.wrap_socket(connection, server_side=True) as tls:
                tls.settimeout(5)
                while chunk := tls.recv(65536):
                    received += chunk
        except (ssl.SSLError, OSError):
            pass
        calling.join(15)
    assert received == b"", f"A sent its request to a callee revoked during the handshake: {received[:100]!r}"
    problem = answers[0].json()
    assert answers[0].status_code == 502 and problem["hop"] == "service-a → service-b"
    assert problem["reason"].endswith("failed our check that it is service-b: certificate revoked")


# ── 2. a connection that outlives the trust its certificate had ─────────────────────────────────────────────


def short_lived_client(layout: Layout, directory: Path) -> tuple[ssl.SSLContext, dt.datetime]:
    """The client's identity on a certificate that expires in 2 to 3 s (its dates are kept to the second), well
    within uvicorn's 5 s of idle keep-alive: a context presenting it, and the moment it expires."""
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    short = load_issuer(layout).issue("client", usages=["client"], uris=[POLICY.spiffe_id("client")], not_after=expires)
    context = attacker_context(layout.ca_cert, Credentials(*short.write(directory, "short-lived")))
    return context, short.cert.not_valid_after_utc


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.e2e
def test_a_connection_kept_open_past_its_certificates_expiry_gets_no_further(layout: Layout, tmp_path: Path) -> None:
    """TLS verified the certificate once, when the connection opened. Its next request after the expiry is refused
    on that same connection, and service-b sees nothing. (The clock is slowed here so that it does not close the
    connection first; the same rule refuses a request A read just before a reload cut a revoked caller's.)"""
    with a_and_b(layout, tmp_path, MESH_RELOAD_INTERVAL="60") as mesh:
        context, expiry = short_lived_client(layout, tmp_path)
        url = f"{mesh['service-a'].url}/chain"
        with httpx.Client(verify=context, timeout=5) as attacker:
            first = attacker.get(url, extensions={"sni_hostname": "service-a"})
            assert first.status_code == 200
            wait_until(lambda: dt.datetime.now(dt.UTC) > expiry, timeout=5)
            marks = mesh.marks()
            answer = attacker.get(url, extensions={"sni_hostname": "service-a"})
            assert local_port(answer) == local_port(first), "not on the connection the first request opened"
    assert answer.status_code == 403, answer.text
    assert answer.json()["reason"].endswith("since its connection opened: certificate has expired")
    seen = mesh.events_since(marks)
    assert [e["reason"] for e in seen["service-a"]] == [answer.json()["reason"]] and seen["service-b"] == []


@pytest.mark.e2e
def test_a_connection_is_closed_once_its_certificate_expires(layout: Layout, tmp_path: Path) -> None:
    """No file changes when a certificate expires, so no reload runs; the service's clock closes the connection
    within a tick. The caller's next request needs a new handshake, which is refused, and no service sees it."""
    with a_and_b(layout, tmp_path) as mesh:
        service = mesh["service-a"]
        context, expiry = short_lived_client(layout, tmp_path)
        url = f"{service.url}/chain"
        with httpx.Client(verify=context, timeout=5) as attacker:
            assert attacker.get(url, extensions={"sni_hostname": "service-a"}).status_code == 200
            mark = service.mark()
            wait_until(lambda: service.events_since(mark, "expired_connections_closed") != [], timeout=5)
            assert dt.datetime.now(dt.UTC) > expiry
            marks = mesh.marks()
            with pytest.raises(TLS_REFUSALS):
                attacker.get(url, extensions={"sni_hostname": "service-a"})
    assert [e["closed"] for e in service.events_since(mark, "expired_connections_closed")] == [1]
    assert mesh.events_since(marks) == {"service-a": [], "service-b": []}


@pytest.mark.e2e
def test_a_callee_whose_certificate_expires_gets_no_more_calls(layout: Layout, tmp_path: Path) -> None:
    """The same from the calling side: A keeps its connection to B busy (a request every 50 ms), B's certificate
    expires, and A's clock retires the connection (the pool closes it once the call on it is done). The next call
    needs a new handshake, which A refuses: 502 naming the reason, and B sees nothing of it."""
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)  # time enough for both services to start
    sans = {**service_sans("service-b", POLICY), "uris": [POLICY.spiffe_id("service-b")]}
    short = load_issuer(layout).issue("service-b", **sans, usages=("server", "client"), not_after=expires)
    short.write(layout.out, "service-b")
    with a_and_b(layout, tmp_path) as mesh:
        url, client = f"{mesh['service-a'].url}/chain", attacker_context(layout.ca_cert, mesh.credentials("client"))
        assert get(url, "service-a", client).status_code == 200
        wait_until(lambda: get(url, "service-a", client).status_code == 502, timeout=12)
        assert dt.datetime.now(dt.UTC) > short.cert.not_valid_after_utc
        marks = mesh.marks()
        answer = get(url, "service-a", client)
    assert answer.status_code == 502 and answer.json()["reason"].endswith("certificate has expired"), answer.text
    assert mesh.events_since(marks)["service-b"] == []
    assert any(e["closed"] >= 1 for e in mesh["service-a"].events_since(0, "expired_connections_closed"))


# ── 4. a CA is recognised by its key ─────────────────────────────────────────────────────────────────────────


@pytest.mark.e2e
def test_a_new_ca_under_a_running_mesh_is_taken_whole(layout: Layout, tmp_path: Path) -> None:
    """`pki init --force` into the live PKI directory: a new root and intermediate with the old names. The
    services take the new CA whole: the old CA's open connection is cut and its certificate refused, the new
    client certificate goes through the chain."""
    old_client = Credentials(*_copy(layout, "client", tmp_path / "old"))
    write_crl(layout)  # the old CA's CRL is now number 2, the new CA's first will be number 1: not its successor
    with a_and_b(layout, tmp_path) as mesh:
        service = mesh["service-a"]
        url = f"{service.url}/chain"
        with httpx.Client(verify=attacker_context(layout.ca_cert, old_client), timeout=5) as old:
            assert old.get(url, extensions={"sni_hostname": "service-a"}).status_code == 200
            mark = service.mark()
            init(layout, POLICY, force=True)
            new = attacker_context(layout.ca_cert, mesh.credentials("client"))

            def new_client_goes_through() -> bool:
                try:
                    return get(url, "service-a", new).status_code == 200
                except TLS_REFUSALS:
                    return False

            wait_until(new_client_goes_through, describe=lambda: str(service.events_since(mark, "reload_refused")))
            assert service.events_since(mark, "reload_refused") == []
            with pytest.raises(TLS_REFUSALS):  # cut when the new CA came in, not left to idle out
                old.get(url, extensions={"sni_hostname": "service-a"})
        assert any(e.get("revoked_connections_closed", 0) >= 1 for e in service.events_since(mark, "reloaded"))
        marks = mesh.marks()
        trusting_both = attacker_context(tmp_path / "old" / "ca.crt", old_client)
        trusting_both.load_verify_locations(layout.ca_cert)  # so that the refusal is A's, not ours of A
        with pytest.raises(TLS_REFUSALS):
            get(url, "service-a", trusting_both)
        assert mesh.events_since(marks) == {"service-a": [], "service-b": []}


# ── the rules themselves, on LiveTLS (no process) ───────────────────────────────────────────────────────────


def live_tls(layout: Layout) -> LiveTLS:
    return LiveTLS(layout.material("service-a"))


def peer(layout: Layout, name: str) -> PeerIdentity:
    """`name`'s identity as a connection records it: with the anchor its chain was verified against."""
    return dataclasses.replace(identity_of(Credentials(layout.cert(name), layout.key(name))), anchor=anchor(layout))


def anchor(layout: Layout) -> str:
    return thumbprint(load_certificates(layout.ca_cert)[0])


def test_revocation_expiry_and_anchors_are_rechecked_by_key(layout: Layout) -> None:
    live = live_tls(layout)
    client = peer(layout, "client")
    assert live.refusal(client) is None
    revoke(layout, "client")
    live.reload()
    assert live.refusal(client) == "certificate revoked"
    assert live.refusal(dataclasses.replace(client, serial=client.serial + 1)) is None  # a serial, not a name
    service_b = peer(layout, "service-b")
    assert live.refusal(dataclasses.replace(service_b, not_after=dt.datetime.now(dt.UTC))) == "certificate has expired"
    assert "not in ca.crt" in (live.refusal(dataclasses.replace(service_b, anchor="00" * 32)) or "")
    # The issuer is its key: the same issuer name with another key id has no CRL in force.
    assert "no CRL of it is in force" in (live.refusal(dataclasses.replace(service_b, issuer_key_id="ab" * 20)) or "")


def test_outside_its_crl_s_validity_no_peer_of_that_ca_gets_in(layout: Layout) -> None:
    """OpenSSL refused every leaf of a CA whose CRL had expired (or was not valid yet); the services no longer give
    OpenSSL the CRL, so they refuse the same, with OpenSSL's words."""
    live, client = live_tls(layout), peer(layout, "client")
    now = dt.datetime.now(dt.UTC)
    [issuer] = live.trust.windows
    for window, reason in (((now - dt.timedelta(days=2), now - dt.timedelta(seconds=1)), "CRL has expired"),
                           ((now + dt.timedelta(minutes=1), None), "CRL is not yet valid")):  # fmt: skip
        live.trust = dataclasses.replace(live.trust, windows={issuer: window})
        assert live.refusal(client) == reason
    live.reload()
    assert live.refusal(client) is None


def test_a_new_ca_with_the_old_names_is_a_new_issuer(layout: Layout) -> None:
    """`pki init --force`: its first CRL (number 1) is not an "older CRL from the same issuer" than the old CA's
    number 3 — the keys differ — so it is taken, and the old CA's certificates are refused."""
    write_crl(layout), write_crl(layout)
    live = live_tls(layout)
    old_client = peer(layout, "client")
    init(layout, POLICY, force=True)
    live.reload()
    assert "its root CA" in (live.refusal(old_client) or "")  # by fingerprint: the old root left ca.crt
    assert "its issuing CA" in (live.refusal(dataclasses.replace(old_client, anchor=None)) or "")  # by key id
    assert live.refusal(peer(layout, "client")) is None


def test_an_older_crl_of_the_same_key_is_refused_naming_the_fix(layout: Layout) -> None:
    live = live_tls(layout)
    older = layout.crl.read_bytes()
    revoke(layout, "client")
    live.reload()
    write_file(layout.crl, older)
    with pytest.raises(MaterialError, match=r"the same key as the one in force.*un-revoke.*run `make pki`"):
        live.reload()
    assert live.refusal(peer(layout, "client")) == "certificate revoked"  # and nothing changed


def test_an_expired_crl_is_refused_naming_the_fix(layout: Layout) -> None:
    issuer = load_issuer(layout)
    write_file(layout.crl, empty_crl(issuer, next_update=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)))
    with pytest.raises(MaterialError, match=r"crl.pem: the CRL of CN=.* expired on .* run `make pki` to re-sign it"):
        live_tls(layout)


def _copy(layout: Layout, name: str, directory: Path) -> tuple[Path, Path]:
    """A copy of `name`'s certificate and key (and of ca.crt), as they are now: the old CA's, soon."""
    directory.mkdir()
    for source, target in ((layout.cert(name), "client.crt"), (layout.key(name), "client.key")):
        write_file(directory / target, source.read_bytes(), private=target.endswith(".key"))
    write_file(directory / "ca.crt", layout.ca_cert.read_bytes())
    return directory / "client.crt", directory / "client.key"


def empty_crl(issuer: CertificateAuthority, next_update: dt.datetime | None = None) -> bytes:
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now - dt.timedelta(minutes=2))
        .next_update(next_update or now + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)
