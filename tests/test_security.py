"""The findings of the independent security review (issue #16), each attacked as the review did.

Every test here failed against the code before its fix. They run real services on loopback; the attackers
use raw sockets and hand-built `ssl` contexts, as an attacker would.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

from pki import PKIError, Policy, init, issue_identity, load_issuer, revoke, write_crl
from services.local import chain_environments, running
from shared.layout import Layout
from shared.x509 import load_crl
from tests.support import Credentials, Service, attacker_context, free_ports, start_services, wait_until

pytestmark = pytest.mark.e2e

POLICY = Policy.load()
RELOAD_INTERVAL = 0.5


@contextmanager
def one_service(layout: Layout, tmp_path: Path, name: str = "service-c", **env: str) -> Iterator[Service]:
    """One service on a free port, calling nobody; stopped on the way out."""
    (port,) = free_ports(1)
    envs = chain_environments([port], layout.out, names=[name], MESH_RELOAD_INTERVAL=str(RELOAD_INTERVAL), **env)
    processes = start_services(envs, tmp_path)
    with running(processes):
        yield Service(processes[0])


@pytest.fixture
def fresh_layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "pki")
    init(layout)
    return layout


def raw_request(
    port: int,
    context: ssl.SSLContext,
    *,
    server_name: str = "service-c",
    path: str = "/healthz",
    session: ssl.SSLSession | None = None,
) -> tuple[int | None, ssl.SSLSession | None]:
    """One HTTP/1.1 request on a new connection: (status or None if refused, the TLS session to resume)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=server_name, session=session) as tls,
        ):
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):  # to the end: TLS 1.3 tickets arrive after the handshake
                data += chunk
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
            return status, tls.session
    except (ssl.SSLError, OSError):
        return None, None


# ── 1. resumption must not walk past revocation or expiry ─────────────────────────────────────────────────


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_revoked_client_cannot_resume_its_old_session(fresh_layout: Layout, tmp_path: Path, version) -> None:
    layout = fresh_layout
    with one_service(layout, tmp_path, name="service-a") as service:
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        context.maximum_version = version

        def call(session: ssl.SSLSession | None = None) -> tuple[int | None, ssl.SSLSession | None]:
            return raw_request(service.port, context, server_name="service-a", path="/chain", session=session)

        status, session = call()
        assert status == 200
        mark = service.mark()
        revoke(layout, "client", "key-compromise")
        wait_until(lambda: any("crl.pem" in str(e.get("files")) for e in service.events_since(mark, "reloaded")))
        assert call()[0] is None  # a full handshake is refused...
        assert call(session)[0] is None  # ...and so is resuming the session from before the revocation
        assert service.events_since(mark, "authz") == []  # no request reached the app


def test_no_ticket_is_issued(fresh_layout: Layout, tmp_path: Path) -> None:
    """TLS 1.3 resumes only with a ticket: none is issued, so a TLS 1.3 client always does a full handshake."""
    layout = fresh_layout
    with one_service(layout, tmp_path) as service:
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        status, session = raw_request(service.port, context)
        assert status == 200 and session is not None
        assert not session.has_ticket


def test_a_good_tls12_session_may_still_resume(fresh_layout: Layout, tmp_path: Path) -> None:
    """The re-check refuses what a full handshake would refuse, and nothing more: resumption keeps working."""
    layout = fresh_layout
    with one_service(layout, tmp_path) as service:
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        _, session = raw_request(service.port, context)
        assert raw_request(service.port, context, session=session)[0] == 200


def test_an_expired_certificate_cannot_resume(fresh_layout: Layout, tmp_path: Path) -> None:
    layout = fresh_layout
    now = dt.datetime.now(dt.UTC)
    short = load_issuer(layout).issue(
        "short-lived",
        usages=["client"],
        uris=[POLICY.spiffe_id("short-lived")],
        not_after=now + dt.timedelta(seconds=8),
    )
    cert, key = short.write(tmp_path, "short-lived")
    with one_service(layout, tmp_path) as service:
        context = attacker_context(layout.ca_cert, Credentials(cert, key))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        status, session = raw_request(service.port, context)
        assert status == 200
        wait_until(lambda: dt.datetime.now(dt.UTC) > short.cert.not_valid_after_utc, timeout=12)
        assert raw_request(service.port, context)[0] is None
        assert raw_request(service.port, context, session=session)[0] is None


# ── 3. a lost crl.pem must not un-revoke anyone ───────────────────────────────────────────────────────────


def test_make_pki_after_losing_the_crl_keeps_every_revocation(fresh_layout: Layout) -> None:
    layout = fresh_layout
    [serial] = revoke(layout, "client", "key-compromise")
    before = load_crl(layout.crl)
    layout.crl.unlink()
    init(layout)  # what the service's error message recommends
    after = load_crl(layout.crl)
    assert serial in {entry.serial_number for entry in after}
    assert crl_number(after) > crl_number(before)
    assert after.last_update_utc > before.last_update_utc


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_a_service_refuses_a_crl_that_drops_a_revocation(fresh_layout: Layout, tmp_path: Path) -> None:
    layout = fresh_layout
    with one_service(layout, tmp_path) as service:
        client = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        assert raw_request(service.port, client)[0] == 200
        mark = service.mark()
        revoke(layout, "client", "key-compromise")
        wait_until(lambda: raw_request(service.port, client)[0] is None)
        # A newer CRL that forgets the revocation, as `make pki` used to write after crl.pem was lost.
        layout.revocations.unlink()
        layout.crl.unlink()
        write_crl(layout)
        refusals = lambda: service.events_since(mark, "reload_refused")  # noqa: E731
        wait_until(lambda: any("un-revoke" in e["reason"] for e in refusals()))
        assert raw_request(service.port, client)[0] is None


# ── 4. connections cannot be held open for ever, nor without limit ────────────────────────────────────────


def open_idle(port: int, context: ssl.SSLContext, server_name: str = "service-c") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname=server_name)


def closed_by_server(connection: ssl.SSLSocket) -> bool:
    try:
        return connection.recv(1) == b""
    except (ssl.SSLError, OSError):
        return True


def test_idle_authenticated_connections_are_closed(fresh_layout: Layout, tmp_path: Path) -> None:
    layout = fresh_layout
    with one_service(layout, tmp_path, MESH_REQUEST_TIMEOUT="1") as service:
        # A stranger: on no allow-list, yet its certificate is from our CA.
        issue_identity(layout, POLICY, "stranger", client_only=True)
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("stranger"), layout.key("stranger")))
        idle = [open_idle(service.port, context) for _ in range(20)]
        start = time.monotonic()
        assert all(closed_by_server(c) for c in idle)  # blocks until the server closes (socket timeout 10 s)
        assert time.monotonic() - start < 1 + 3
        timeouts = service.events_since(0, "request_timeout")
        assert len(timeouts) == 20 and all(e["level"] == "warning" for e in timeouts)
        for c in idle:
            c.close()


def test_a_request_trickled_byte_by_byte_is_cut_off(fresh_layout: Layout, tmp_path: Path) -> None:
    layout = fresh_layout
    with one_service(layout, tmp_path, MESH_REQUEST_TIMEOUT="1") as service:
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        connection = open_idle(service.port, context)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: service-c\r\n")
        start = time.monotonic()
        cut = False
        while time.monotonic() - start < 5:
            try:
                connection.sendall(b"X-Slow: y\r\n")
            except (ssl.SSLError, OSError):
                cut = True
                break
            connection.settimeout(0.2)
            try:
                if connection.recv(1) == b"":
                    cut = True
                    break
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                cut = True
                break
        assert cut, "a request trickled for 5 s was not cut off"
        assert time.monotonic() - start < 1 + 2
        assert service.events_since(0, "request_timeout")
        connection.close()


def test_a_stalled_handshake_is_timed_out_and_logged(fresh_layout: Layout, tmp_path: Path) -> None:
    with one_service(fresh_layout, tmp_path, MESH_HANDSHAKE_TIMEOUT="1") as service:
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as raw:
            assert raw.recv(1) == b""  # the server gave up on us
        wait_until(lambda: service.events_since(0, "handshake_timeout") != [])
        assert service.events_since(0, "handshake_timeout")[0]["level"] == "warning"


def test_at_the_connection_limits_the_largest_holder_gives_way_not_the_newcomer(
    fresh_layout: Layout, tmp_path: Path
) -> None:
    """Issue 20, item 7: a cap a stranger can fill would lock everyone else out (tests/test_flood.py has the flood)."""
    layout = fresh_layout
    limits = {"MESH_MAX_CONNECTIONS": "4", "MESH_MAX_HANDSHAKES": "3", "MESH_FIRST_BYTE_TIMEOUT": "30"}
    with one_service(layout, tmp_path, MESH_HANDSHAKE_TIMEOUT="60", **limits) as service:
        issue_identity(layout, POLICY, "stranger", client_only=True)
        stranger = attacker_context(layout.ca_cert, Credentials(layout.cert("stranger"), layout.key("stranger")))
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        held = [open_idle(service.port, stranger) for _ in range(4)]
        assert raw_request(service.port, context)[0] == 200  # the fifth, of another caller, is served
        assert closed_within(held[0], 5)  # the stranger's connection idle longest made room for it
        assert not closed_within(held[1], 0.2)
        refused = service.events_since(0, "connection_refused")
        assert refused and "4 connections are established" in refused[0]["reason"]
        for connection in held:
            connection.close()
        # Connections not yet authenticated have a cap of their own. A handshake under way (its ClientHello
        # sent), then two silent TCP connections fill it; a caller's connection sheds the older silent one —
        # not the older handshake, not the newer silent one — long before any deadline, instead of being refused.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        hello = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="service-c")
        with contextlib.suppress(ssl.SSLWantReadError):
            hello.do_handshake()
        handshaking = socket.create_connection(("127.0.0.1", service.port))
        handshaking.sendall(outgoing.read())
        assert handshaking.recv(1)  # the service answered: its handshake is under way
        silent = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(2)]
        assert raw_request(service.port, context)[0] == 200
        assert closed_within(silent[0], 5)
        assert not closed_within(silent[1], 0.2) and not closed_within(handshaking, 0.2)
        assert service.events_since(0, "connection_shed") != []
        for s in [handshaking, *silent]:
            s.close()


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the service closes `connection` within `seconds` (a reset counts; a timeout does not)."""
    connection.settimeout(seconds)
    try:
        return connection.recv(1) == b""
    except TimeoutError:  # an OSError: first
        return False
    except OSError:
        return True


def test_a_chunked_body_is_limited_on_a_route_that_does_not_read_it(fresh_layout: Layout, tmp_path: Path) -> None:
    layout = fresh_layout
    with one_service(layout, tmp_path, MESH_MAX_BODY_BYTES="1024") as service:
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        with open_idle(service.port, context) as connection:
            connection.sendall(b"POST /healthz HTTP/1.1\r\nHost: service-c\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
            answer = b""
            try:
                for _ in range(64):  # 64 KiB at most: far over the limit, well under what would hurt
                    connection.sendall(chunk)
                connection.settimeout(5)
                while data := connection.recv(65536):
                    answer += data
            except (ssl.SSLError, OSError):
                pass
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]


# ── 5, 6. the callee's name: no one else may be issued it, and the Common Name does not count ─────────────


@pytest.mark.parametrize(
    "san", ["DNS:service-b", "DNS:Service-B", "service-b", "DNS:*", "URI:spiffe://mesh.internal/x"]
)
def test_pki_refuses_to_issue_another_identitys_name(fresh_layout: Layout, san: str) -> None:
    with pytest.raises(PKIError, match=r"may not carry|SPIFFE ID comes from the name"):
        issue_identity(fresh_layout, POLICY, "billing", extra_sans=[san])
    assert not fresh_layout.cert("billing").exists()


@pytest.mark.parametrize("name", ["Service-B", "a/b", "..", "", "x.y"])
def test_pki_refuses_names_that_are_not_one_dns_label(fresh_layout: Layout, name: str) -> None:
    with pytest.raises(PKIError, match="cannot be an identity name"):
        issue_identity(fresh_layout, POLICY, name)


def test_a_common_name_alone_does_not_pass_as_the_callee(fresh_layout: Layout, tmp_path: Path) -> None:
    """A certificate from our own CA with CN=service-b and only a URI SAN: A must not take it for service-b."""
    layout = fresh_layout
    issuing = load_issuer(layout)
    impostor = issuing.issue("service-b", uris=[POLICY.spiffe_id("impostor")])  # CN=service-b, no DNS SAN
    cert, key = impostor.write(tmp_path, "cn-only")
    a_port, b_port = free_ports(2)
    fake_b = {
        **chain_environments([b_port], layout.out, names=["service-b"])[0],
        "MESH_CERT": str(cert),
        "MESH_KEY": str(key),
        "MESH_DOWNSTREAM_URL": "",
        "MESH_DOWNSTREAM_NAME": "",
    }
    fake_b = {k: v for k, v in fake_b.items() if v}
    a = {
        **chain_environments([a_port], layout.out, names=["service-a"])[0],
        "MESH_DOWNSTREAM_URL": "https://127.0.0.1:" + str(b_port),
        "MESH_DOWNSTREAM_NAME": "service-b",
    }
    processes = start_services([a, fake_b], tmp_path)
    with running(processes):
        client = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        status, _ = raw_request(a_port, client, server_name="service-a", path="/chain")
        assert status == 502
        assert Service(processes[1]).events_since(0, "authz") == []  # the impostor got no request


# ── 7. no key outside pki/out ─────────────────────────────────────────────────────────────────────────────


def test_no_copy_of_the_key_is_left_in_the_temporary_directory(fresh_layout: Layout, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with one_service(fresh_layout, tmp_path, TMPDIR=str(scratch)) as service:
        mark = service.mark()
        fresh_layout.cert("service-c").write_bytes(fresh_layout.cert("service-c").read_bytes() + b"\n")
        wait_until(lambda: service.events_since(mark, "reloaded") != [])
        assert list(scratch.rglob("*")) == []  # while running, after a reload
    assert list(scratch.rglob("*")) == []  # and after it stopped


# ── 9. files that decide who is trusted must not be writable by others ───────────────────────────────────


@pytest.mark.parametrize("which", ["ca.crt", "crl.pem", "allow/service-c.txt", "service-c.crt"])
def test_a_trust_file_others_can_write_stops_the_service(fresh_layout: Layout, tmp_path: Path, which: str) -> None:
    path = fresh_layout.out / which
    path.chmod(0o666)
    (port,) = free_ports(1)
    envs = chain_environments([port], fresh_layout.out, names=["service-c"])
    unsafe = rf"{which}: .* is writable by other users \(mode 0666\)"
    with pytest.raises(RuntimeError, match=unsafe), running(start_services(envs, tmp_path)):
        pass


def test_a_trust_file_owned_by_someone_else_stops_the_service(fresh_layout: Layout, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(fresh_layout.ca_cert, 12345, 12345)
    (port,) = free_ports(1)
    envs = chain_environments([port], fresh_layout.out, names=["service-c"])
    with (
        pytest.raises(RuntimeError, match=r"ca.crt: CA file belongs to uid 12345"),
        running(start_services(envs, tmp_path)),
    ):
        pass


def test_a_writable_allow_list_is_not_reloaded(fresh_layout: Layout, tmp_path: Path) -> None:
    layout = fresh_layout
    with one_service(layout, tmp_path) as service:
        mark = service.mark()
        allow = layout.allow_list("service-c")
        allow.write_text(allow.read_text() + "# changed by someone else\n")
        allow.chmod(0o646)
        wait_until(lambda: service.events_since(mark, "reload_refused") != [])
        assert "writable by other users" in service.events_since(mark, "reload_refused")[0]["reason"]


# ── 10. a new CA leaves nothing of the old one behind ─────────────────────────────────────────────────────


def test_init_force_forgets_the_old_cas_rotation_and_revocations(fresh_layout: Layout) -> None:
    layout = fresh_layout
    from pki import rotate_begin, rotate_finish

    rotate_begin(layout, POLICY, "client")
    rotate_finish(layout, POLICY, "client")  # previous/client.crt: listed until retired
    revoke(layout, "service-a")
    init(layout, force=True)
    assert not (layout.out / "previous").exists() and not (layout.out / "next").exists()
    assert list(load_crl(layout.crl)) == []
    assert layout.allow_list("service-a").read_text().count("# client") == 1
    shutil.rmtree(layout.out)
