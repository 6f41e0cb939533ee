"""Issue 20, items 2 and 7: every way a connection ends gives its slot back, and no flood locks callers out.

The slot counts are read as the operator reads them, from the service's /metrics (the scrape's own connection
is the one established connection of the baseline). Each test makes a connection end one way and waits for
the counts to come back; the last ones flood real services as an attacker would (bench/flood.py).
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.flood import GREEDY, flood, prepare
from pki import Policy, issue_identity, revoke
from services.local import chain_environments, running
from shared.inbound import raise_open_files_limit
from shared.layout import Layout
from tests.support import (
    FULL_MATRIX,
    Credentials,
    Service,
    attacker_context,
    free_ports,
    get,
    start_services,
    wait_until,
)

pytestmark = pytest.mark.e2e

BASELINE = {"established": 1, "unauthenticated": 0, "handshakes": 0}  # the scrape's own connection
SHORT = {  # deadlines short enough to watch them fire
    "MESH_FIRST_BYTE_TIMEOUT": "0.5",
    "MESH_HANDSHAKE_TIMEOUT": "1",
    "MESH_REQUEST_TIMEOUT": "3",
    "MESH_SHUTDOWN_TIMEOUT": "1",
    "MESH_RELOAD_INTERVAL": "0.2",
    "MESH_MAX_CONNECTIONS_PER_CALLER": "4",
    "MESH_MAX_CONNECTIONS": "64",  # few enough that the upgrade test below outnumbers it
}
# More upgrades than MESH_MAX_CONNECTIONS above: one slot kept by each would fill the table. `make test-full`
# runs 1,100 (more than the 1,024 a service allows by default, the cap this proof once ran against).
UPGRADES = 1100 if FULL_MATRIX else 100


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = prepare(tmp_path_factory.mktemp("flood") / "pki")  # with GREEDY: our CA, on no allow-list
    issue_identity(layout, Policy.load(), "doomed", client_only=True)  # to be revoked while connected
    return layout


@pytest.fixture(scope="module")
def service(pki: Layout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """service-c on its own, calling nobody, with short deadlines."""
    envs = chain_environments(free_ports(1), pki.out, names=["service-c"], **SHORT)
    processes = start_services(envs, tmp_path_factory.mktemp("flood-logs"))
    with running(processes):
        yield Service(processes[0])


def context(layout: Layout, name: str | None) -> ssl.SSLContext:
    return attacker_context(layout.ca_cert, Credentials(layout.cert(name), layout.key(name)) if name else None)


def counts(service: Service, layout: Layout) -> dict[str, int]:
    text = get(f"{service.url}/metrics", service.name, context(layout, "operator")).text

    def value(name: str) -> int:
        found = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        assert found, f"/metrics has no {name}"
        return int(float(found.group(1)))

    return {
        "established": value("mesh_connections_established"),
        "unauthenticated": value("mesh_connections_unauthenticated"),
        "handshakes": value("mesh_tls_handshakes_running"),
    }


def released(service: Service, layout: Layout, timeout: float = 10) -> None:
    """Until the service's connection counts are back at the baseline; fails the test if they stay above."""
    last: dict[str, int] = {}

    def back() -> bool:
        last.update(counts(service, layout))
        return last == BASELINE

    wait_until(back, timeout, describe=lambda: f"connection counts {last}, baseline {BASELINE}")


def connect(service: Service, tls_context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    return tls_context.wrap_socket(raw, server_hostname=service.name)


def closed_by_service(connection: socket.socket, within: float = 10) -> bool:
    connection.settimeout(within)
    try:
        while connection.recv(65536):
            pass
        return True
    except TimeoutError:  # (an OSError: first)
        return False
    except (ssl.SSLError, OSError):
        return True  # a reset, or a TLS alert: closed all the same


def client_hello(service: Service) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    handshake = context_without_certificate(service).wrap_bio(incoming, outgoing, server_hostname=service.name)
    with contextlib.suppress(ssl.SSLWantReadError):
        handshake.do_handshake()
    return outgoing.read()


def context_without_certificate(service: Service) -> ssl.SSLContext:
    tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls_context.check_hostname, tls_context.verify_mode = False, ssl.CERT_NONE
    return tls_context


# ── item 2: every way a connection can end gives its slot back ────────────────────────────────────────


def ends_refused_at_the_handshake(service: Service, layout: Layout) -> None:
    try:
        with connect(service, context(layout, None)) as connection:  # no certificate
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: service-c\r\n\r\n")
            answer = connection.recv(1)  # TLS 1.3: the refusal shows at the first read
    except (ssl.SSLError, OSError):
        answer = b""
    assert answer == b""


def closed_for(service: Service, layout: Layout, reason: str) -> float:
    text = get(f"{service.url}/metrics", service.name, context(layout, "operator")).text
    found = re.search(rf'^mesh_connections_closed_total{{[^}}]*reason="{reason}"[^}}]*}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def ends_at_the_first_byte_deadline(service: Service, layout: Layout) -> None:
    before = closed_for(service, layout, "first_byte_timeout")
    with socket.create_connection(("127.0.0.1", service.port)) as raw:
        assert closed_by_service(raw, within=5)
        released(service, layout)  # while our end is still open: the service let go by itself
    assert closed_for(service, layout, "first_byte_timeout") == before + 1


def ends_at_the_handshake_deadline(service: Service, layout: Layout) -> None:
    before = closed_for(service, layout, "handshake_timeout")
    with socket.create_connection(("127.0.0.1", service.port)) as raw:
        raw.sendall(client_hello(service))  # and nothing after: the first byte came, the handshake never ends
        assert closed_by_service(raw, within=5)
        released(service, layout)
    assert closed_for(service, layout, "handshake_timeout") == before + 1


def ends_with_the_peer_gone_mid_handshake(service: Service, layout: Layout) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as raw:
        raw.sendall(client_hello(service))
        raw.recv(1)  # the service has answered: the handshake is under way
    # and the peer is gone


def ends_closed_by_the_peer(service: Service, layout: Layout) -> None:
    with connect(service, context(layout, "service-b")) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: service-c\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")


def ends_at_the_request_deadline(service: Service, layout: Layout) -> None:
    with connect(service, context(layout, "service-b")) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\n")  # and the rest never comes
        assert closed_by_service(connection, within=8)
        released(service, layout)


def ends_with_an_upgrade(service: Service, layout: Layout) -> None:
    with connect(service, context(layout, GREEDY)) as connection:
        connection.sendall(upgrade_request())
        answer = connection.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        assert b"switches to no other protocol" in answer
        assert closed_by_service(connection, within=5)
        released(service, layout)


def ends_with_a_parser_error(service: Service, layout: Layout) -> None:
    with connect(service, context(layout, "service-b")) as connection:
        connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 400")
        assert closed_by_service(connection, within=5)
        released(service, layout)


def ends_at_the_keep_alive_timeout(service: Service, layout: Layout) -> None:
    with connect(service, context(layout, "service-b")) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: service-c\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        # Then silence, never reading: the service's close_notify goes unanswered (MESH_SHUTDOWN_TIMEOUT).
        time.sleep(5)  # uvicorn's keep-alive timeout
        released(service, layout, timeout=5)


def ends_shed_at_the_callers_limit(service: Service, layout: Layout) -> None:
    greedy = context(layout, GREEDY)
    held = [connect(service, greedy) for _ in range(4)]  # the limit per caller (SHORT)
    try:
        held[0].sendall(b"GET /healthz HTTP/1.1\r\n")  # a request under way: busy, so not to be shed
        for connection in held[1:]:  # served, then idle
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: service-c\r\n\r\n")
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        newest = connect(service, greedy)
        newest.sendall(b"GET /healthz HTTP/1.1\r\nHost: service-c\r\n\r\n")
        assert newest.recv(65536).startswith(b"HTTP/1.1 200")  # the newest is served
        assert closed_by_service(held[1], within=5)  # the caller's own connection idle longest made room
        assert not closed_by_service(held[0], within=0.2)  # not the busy one, although older
        assert counts(service, layout)["established"] == 1 + 4  # the scrape's, and the greedy's four
        newest.close()
    finally:
        for connection in held:
            connection.close()


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    try:
        assert raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


ENDINGS: list[Callable[[Service, Layout], None]] = [
    ends_refused_at_the_handshake,
    ends_at_the_first_byte_deadline,
    ends_at_the_handshake_deadline,
    ends_with_the_peer_gone_mid_handshake,
    ends_closed_by_the_peer,
    ends_at_the_request_deadline,
    ends_with_an_upgrade,
    ends_with_a_parser_error,
    ends_at_the_keep_alive_timeout,
    ends_shed_at_the_callers_limit,
]


@pytest.mark.parametrize("ending", ENDINGS, ids=lambda f: f.__name__)
def test_a_connection_gives_its_slot_back(service: Service, pki: Layout, ending: Callable) -> None:
    released(service, pki)
    ending(service, pki)
    released(service, pki)


def test_a_revoked_callers_connection_is_closed_and_gives_its_slot_back(service: Service, pki: Layout) -> None:
    released(service, pki)
    with connect(service, context(pki, "doomed")) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: service-c\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        revoke(pki, "doomed")
        assert closed_by_service(connection, within=10)  # close_where, after the reload
        released(service, pki)


def upgrade_request() -> bytes:
    return (
        b"GET /healthz HTTP/1.1\r\nHost: service-c\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )


def test_upgrades_from_an_unlisted_certificate_leave_no_slot_taken(service: Service, pki: Layout) -> None:
    """More WebSocket upgrades than the service allows connections (MESH_MAX_CONNECTIONS) from a certificate of
    our CA that no allow-list names; then the allow-listed caller is still served, and nothing is held."""
    greedy = context(pki, GREEDY)

    def upgrade(_: int) -> bytes:
        with connect(service, greedy) as connection:
            connection.sendall(upgrade_request())
            answer = connection.recv(65536)
            closed_by_service(connection, within=5)
            return answer[:12]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(upgrade, range(UPGRADES)))
    assert set(answers) == {b"HTTP/1.1 400"}
    allowed = get(f"{service.url}/healthz", service.name, context(pki, "service-b"))
    assert allowed.status_code == 200
    released(service, pki)


# ── item 7: a flood of sockets, stalled handshakes and one greedy certificate locks nobody out ──────────


def test_allow_listed_calls_get_through_a_flood(tmp_path: Path) -> None:
    """3,000 idle or garbage TCP connections, 200 stalled handshakes and a certificate of our CA holding all it
    can get, against A: the client's calls through the chain, each on a new connection, still succeed."""
    layout = prepare(tmp_path / "pki")
    # A cap on unauthenticated connections well below the flood, so that it is shedding that keeps callers in.
    envs = chain_environments(free_ports(3), layout.out, MESH_LOG_LEVEL="warning", MESH_MAX_HANDSHAKES="256")
    processes = start_services(envs, tmp_path)
    with running(processes):
        a = Service(processes[0])
        result = flood(a.port, layout, idle=3000, stalled=200, held=200, call_seconds=8, ramp=8)
        print(result.report())
        # The flood was real: every socket was open at some point, and the greedy certificate held its share.
        assert result.attacker["most_idle"] >= 1000 and result.attacker["most_stalled"] >= 100
        assert result.attacker["most_held"] >= 100  # of the 128 one caller may hold
        assert len(result.calls) >= 20
        assert result.ok >= 0.99 * len(result.calls), result.report()
        assert result.metrics['mesh_connections_closed_total{reason="unauthenticated_shed"}'] > 0
        released(a, layout, timeout=30)  # and once the attacker is gone, nothing of it is left
