"""Hardening: what a scanner sees, what operators see, and how the mesh holds under faults and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvloop

from bench.soak import FD_BOUND, Usage, soak
from pki import init, revoke
from services.local import chain_environments, running
from shared import tls
from shared.layout import Layout
from shared.outbound import Downstream, nativetls
from shared.problem import Problem
from shared.tokens import USER_GRANT
from shared.x509 import SpiffeId
from tests.support import (
    FULL_MATRIX,
    Credentials,
    Mesh,
    Service,
    attacker_context,
    authorize_by,
    forge,
    free_ports,
    get,
    identity_of,
    once_for_both_modes,
    post_token,
    start_services,
    token_claims,
    wait_until,
)

pytestmark = pytest.mark.e2e

SERVICES = ["service-a", "service-b", "service-c"]
INTERMEDIATE_TLS12 = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}


# ── the scanner ────────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="session")
def sslyze() -> str:
    path = os.environ.get("MESH_SSLYZE", ".venv-tools/bin/sslyze")
    if not Path(path).exists():
        pytest.skip(f"sslyze not found at {path}: run the tests with `make test`, which installs it")
    return path


def scan(sslyze: str, port: int, name: str, creds: Credentials | None, tmp_path: Path) -> dict:
    """sslyze's JSON for one server (SSLv2 is left out: its probe breaks when a client certificate is set)."""
    out = tmp_path / f"scan-{port}.json"
    checks = ["--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3", "--compression", "--reneg"]
    checks += ["--heartbleed", "--openssl_ccs", "--robot"]
    auth = ["--cert", str(creds.cert), "--key", str(creds.key)] if creds else []
    subprocess.run(
        [sslyze, *auth, *checks, "--json_out", str(out), f"{name}:{port}{{127.0.0.1}}"],
        capture_output=True,
        timeout=180,
        check=False,
    )
    return json.loads(out.read_text())["server_scan_results"][0]


def accepted(result: dict, version: str) -> set[str]:
    suites = result["scan_result"][f"{version}_cipher_suites"]["result"]["accepted_cipher_suites"]
    return {suite["cipher_suite"]["name"] for suite in suites}


@pytest.mark.parametrize("service", SERVICES)
def test_sslyze_intermediate_profile(mesh: Mesh, sslyze: str, service: str, tmp_path: Path) -> None:
    skip_unless_pinned(mesh.layout)
    result = scan(sslyze, mesh[service].port, service, mesh.credentials("client"), tmp_path)
    assert result["connectivity_status"] == "COMPLETED"
    for old in ["ssl_3_0", "tls_1_0", "tls_1_1"]:
        assert accepted(result, old) == set(), f"{old} accepted"
    assert accepted(result, "tls_1_2") and accepted(result, "tls_1_2") <= INTERMEDIATE_TLS12
    assert accepted(result, "tls_1_3")
    checks = result["scan_result"]
    assert checks["tls_compression"]["result"]["supports_compression"] is False
    assert checks["session_renegotiation"]["result"]["is_vulnerable_to_client_renegotiation_dos"] is False
    assert checks["session_renegotiation"]["result"]["supports_secure_renegotiation"] is True
    assert checks["heartbleed"]["result"]["is_vulnerable_to_heartbleed"] is False
    assert checks["openssl_ccs_injection"]["result"]["is_vulnerable_to_ccs_injection"] is False
    assert checks["robot"]["result"]["robot_result"].startswith("NOT_VULNERABLE")


def test_sslyze_modern_profile_is_tls13_only(layout: Layout, sslyze: str, tmp_path: Path) -> None:
    skip_unless_pinned(layout)
    env = chain_environments(free_ports(1), layout.out, names=["service-c"], MESH_TLS_PROFILE="modern")[0]
    with running(start_services([env], tmp_path)):
        creds = Credentials(layout.cert("service-b"), layout.key("service-b"))
        result = scan(sslyze, int(env["MESH_PORT"]), "service-c", creds, tmp_path)
    assert result["connectivity_status"] == "COMPLETED"
    for old in ["ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2"]:
        assert accepted(result, old) == set(), f"{old} accepted under the modern profile"
    assert accepted(result, "tls_1_3")


def test_sslyze_without_a_certificate_cannot_connect(mesh: Mesh, sslyze: str, tmp_path: Path) -> None:
    skip_unless_pinned(mesh.layout)
    result = scan(sslyze, mesh["service-a"].port, "service-a", None, tmp_path)
    assert result["connectivity_status"] == "ERROR"
    assert "peer closed the connection" in result["connectivity_error_trace"]


# ── rejections you can see ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("no-certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("foreign-ca", "unable to get local issuer certificate"),
        ("self-signed", "self-signed certificate"),
        ("expired", "certificate has expired"),
        ("not-yet-valid", "certificate is not yet valid"),
        ("server-auth-only", "unsuitable certificate purpose"),
    ],
)
def test_a_refused_handshake_is_logged_with_its_reason(
    mesh: Mesh, hostile: dict[str, Credentials], kind: str, reason: str
) -> None:
    service = mesh["service-b"]
    mark = service.mark()
    creds = None if kind == "no-certificate" else hostile[kind]
    with pytest.raises(httpx.HTTPError):
        get(f"{service.url}/chain", service.name, attacker_context(mesh.layout.ca_cert, creds))
    wait_until(lambda: service.events_since(mark, "tls_refused") != [], timeout=5)
    refusals = service.events_since(mark, "tls_refused")
    assert len(refusals) == 1, refusals
    assert refusals[0]["level"] == "warning"
    assert refusals[0]["reason"] == reason
    assert re.fullmatch(r"127\.0\.0\.1:\d+", refusals[0]["peer"])


def test_a_revoked_certificate_is_logged_as_revoked(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "pki")
    init(layout)
    env = chain_environments(free_ports(1), layout.out, names=["service-c"], MESH_RELOAD_INTERVAL="0.2")[0]
    (process,) = start_services([env], tmp_path)
    service = Service(process)
    with running([process]):
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("service-b"), layout.key("service-b")))
        assert get(f"{service.url}/chain", "service-c", context).status_code == 200
        revoke(layout, "service-b")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                get(f"{service.url}/chain", "service-c", context)
            except httpx.HTTPError:
                break  # (this one may also be a connection made just before the reload, then closed by it)
            time.sleep(0.2)
        with pytest.raises(httpx.HTTPError):  # and now a fresh handshake is refused
            get(f"{service.url}/chain", "service-c", context)
        wait_until(lambda: service.events_since(0, "tls_refused") != [])
    reasons = [e["reason"] for e in service.events() if e.get("event") == "tls_refused"]
    assert reasons and set(reasons) == {"certificate revoked"}


def skip_unless_pinned(layout: Layout) -> None:
    """The TLS layer is the same whatever the allow-lists say: scan it once, not once per mode."""
    if authorize_by(layout) != "thumbprint":
        pytest.skip("TLS scans run in the thumbprint mode only: the allow-list mode does not change TLS")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_decisions_and_refusals_and_are_for_operators_only(
    mesh: Mesh, hostile: dict[str, Credentials]
) -> None:
    service = mesh["service-b"]
    operator = attacker_context(mesh.layout.ca_cert, mesh.credentials("operator"))

    def scrape() -> str:
        response = get(f"{service.url}/metrics", service.name, operator)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text

    before = scrape()
    get(f"{service.url}/chain", service.name, attacker_context(mesh.layout.ca_cert, mesh.credentials("service-a")))
    get(f"{service.url}/chain", service.name, attacker_context(mesh.layout.ca_cert, mesh.credentials("client")))
    get(f"{service.url}/chain", service.name, attacker_context(mesh.layout.ca_cert, hostile["no-eku"]))
    with pytest.raises(httpx.HTTPError):
        get(f"{service.url}/chain", service.name, attacker_context(mesh.layout.ca_cert, None))
    refusals = "mesh_tls_refusals_total"
    wait_until(
        lambda: (
            metric(scrape(), refusals, reason="PEER_DID_NOT_RETURN_A_CERTIFICATE")
            > metric(before, refusals, reason="PEER_DID_NOT_RETURN_A_CERTIFICATE")
        )
    )
    after = scrape()

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, service="service-b", **labels) - metric(before, name, service="service-b", **labels)

    decisions = "mesh_authz_decisions_total"
    listed = "listed" if authorize_by(mesh.layout) == "thumbprint" else "listed_spiffe_id"
    assert (
        moved(decisions, resource="api", decision="allow", reason=listed, caller="spiffe://mesh.internal/service-a")
        == 1
    )
    assert (
        moved(decisions, resource="api", decision="deny", reason="not_listed", caller="spiffe://mesh.internal/client")
        == 1
    )
    assert moved(decisions, resource="api", decision="deny", reason="no_client_auth") == 1
    assert moved("mesh_tls_refusals_total", reason="PEER_DID_NOT_RETURN_A_CERTIFICATE") == 1
    # The CRL's remaining life, to alert on before it expires and locks everyone out (30 days when made).
    assert 29 * 86400 < metric(after, "mesh_crl_next_update_seconds", service="service-b") <= 30 * 86400

    # The client's certificate is perfectly valid, and still may not read the metrics.
    response = get(
        f"{service.url}/metrics", service.name, attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    )
    assert response.status_code == 403
    assert "mesh_authz" not in response.text


# ── tracing ────────────────────────────────────────────────────────────────────────────────────────────


def test_traceparent_is_continued_through_the_chain_and_logged(mesh: Mesh) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    marks = mesh.marks()
    with httpx.Client(verify=context, timeout=10) as client:
        response = client.get(
            f"{mesh['service-a'].url}/chain",
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
            extensions={"sni_hostname": "service-a"},
        )
    assert [hop["trace_id"] for hop in response.json()["hops"]] == [trace_id] * 3
    for name in SERVICES:
        (decision,) = mesh.events_since(marks)[name]
        assert decision["trace_id"] == trace_id, f"{name}'s log line lacks the trace"


def test_a_trace_is_started_when_none_arrives(mesh: Mesh) -> None:
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    trace_ids = {hop["trace_id"] for hop in get(f"{mesh['service-a'].url}/chain", "service-a", context).json()["hops"]}
    assert len(trace_ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", trace_ids.pop())


# ── bad input ──────────────────────────────────────────────────────────────────────────────────────────


def request(mesh: Mesh, method: str, path: str, **kwargs: object) -> httpx.Response:
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    with httpx.Client(verify=context, timeout=10) as client:
        return client.request(
            method, f"{mesh['service-a'].url}{path}", extensions={"sni_hostname": "service-a"}, **kwargs
        )  # type: ignore[arg-type]


def test_unknown_paths_are_404_without_details(mesh: Mesh) -> None:
    response = request(mesh, "GET", "/admin/../../etc/passwd")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Not Found"
    assert "passwd" not in response.text and "Traceback" not in response.text


def test_wrong_method_is_405_problem(mesh: Mesh) -> None:
    response = request(mesh, "DELETE", "/chain")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"


def test_oversized_body_is_413(mesh: Mesh) -> None:
    response = request(mesh, "POST", "/chain", content=b"x" * (256 * 1024))
    assert response.status_code == 413
    assert response.json()["title"] == "Content too large"


def test_oversized_headers_are_refused(mesh: Mesh) -> None:
    response = request(mesh, "GET", "/chain", headers={"x-filler": "y" * (32 * 1024)})
    assert response.status_code == 400
    assert mesh["service-a"].process.process.poll() is None  # type: ignore[union-attr]


# ── faults ─────────────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture
def own_mesh(tmp_path: Path, layout: Layout) -> Iterator[tuple[Mesh, list]]:
    once_for_both_modes(layout)  # a crash, a soak: the allow-list mode changes nothing they measure
    envs = chain_environments(free_ports(3), layout.out)
    processes = start_services(envs, tmp_path)
    with running(processes):
        yield Mesh([Service(p) for p in processes], layout), processes


def test_killing_b_under_load_gives_quick_502s_and_recovers(own_mesh: tuple[Mesh, list]) -> None:
    """Four callers keep calling A while B is killed (SIGKILL, like a crash) and later started again."""
    mesh, processes = own_mesh
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    url = f"{mesh['service-a'].url}/chain"
    outcomes: list[tuple[float, int, float]] = []  # (when, status, seconds taken)
    failed_hops: set[str] = set()
    stop = threading.Event()

    def caller() -> None:
        with httpx.Client(verify=context, timeout=10) as client:
            while not stop.is_set():
                start = time.monotonic()
                response = client.get(url, extensions={"sni_hostname": "service-a"})
                outcomes.append((start, response.status_code, time.monotonic() - start))
                if response.status_code == 502:
                    failed_hops.add(response.json()["hop"])

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for thread in callers:
        thread.start()
    try:
        time.sleep(1)
        b = processes[1]
        killed_at = time.monotonic()
        b.process.send_signal(signal.SIGKILL)
        b.process.wait()
        time.sleep(2)
        b.start()
        b.wait_ready()
        restarted_at = time.monotonic()
        deadline = restarted_at + 10
        while not any(when > restarted_at and status == 200 for when, status, _ in outcomes):
            assert time.monotonic() < deadline, "A did not recover when B came back"
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in callers:
            thread.join(15)

    statuses = {status for _, status, _ in outcomes}
    assert statuses <= {200, 502}, statuses
    failed = [taken for when, status, taken in outcomes if status == 502]
    assert failed, "the kill was not noticed"
    assert failed_hops == {"service-a → service-b"}
    assert max(failed) < 1.0, f"a dead downstream must fail fast, not hang (slowest 502: {max(failed):.2f} s)"
    assert any(status == 200 for when, status, _ in outcomes if when < killed_at)


class Tarpit:
    """A TLS server with service-c's real certificate that accepts requests and never answers."""

    def __init__(self, layout: Layout) -> None:
        material = tls.TLSMaterial(layout.ca_cert, layout.cert("service-c"), layout.key("service-c"), layout.crl)
        self.context = tls.server_context(material)
        self.port = free_ports(1)[0]
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the caller gives up

        async def serve() -> None:
            self.server = await asyncio.start_server(hold, "127.0.0.1", self.port, ssl=self.context)
            self.ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self.server.serve_forever()

        self.loop.run_until_complete(serve())

    def __enter__(self) -> Tarpit:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.thread.join(5)


def test_slow_downstream_is_504_within_the_deadline(layout: Layout, tmp_path: Path) -> None:
    once_for_both_modes(layout)
    with Tarpit(layout) as tarpit:
        a_port, b_port = free_ports(2)
        envs = chain_environments([a_port, b_port, tarpit.port], layout.out)[:2]
        envs[1]["MESH_DOWNSTREAM_TIMEOUT"] = "1"
        processes = start_services(envs, tmp_path)
        context = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        with running(processes):
            b_pid = processes[1].process.pid  # type: ignore[union-attr]
            fds_before = Usage.of(b_pid).fds
            start = time.monotonic()
            response = get(f"https://127.0.0.1:{a_port}/chain", "service-a", context)
            elapsed = time.monotonic() - start
            # More abandoned calls than FD_BOUND, at once (each waits out its 1 s deadline alongside the others),
            # sent to B as A sends them: through A, B's idle connections from A would hold fds for seconds.
            as_a = attacker_context(layout.ca_cert, Credentials(layout.cert("service-a"), layout.key("service-a")))
            with ThreadPoolExecutor(10) as pool:
                late = list(pool.map(lambda _: get(f"https://127.0.0.1:{b_port}/chain", "service-b", as_a), range(10)))
            # B closes the abandoned connections to the tarpit.
            wait_until(
                lambda: Usage.of(b_pid).fds - fds_before <= FD_BOUND,
                timeout=10,
                describe=lambda: (
                    f"connections to the slow downstream leaked: {Usage.of(b_pid).fds - fds_before} fds more"
                ),
            )
    assert response.status_code == 504 and {r.status_code for r in late} == {504}
    problem = response.json()
    assert problem["hop"] == "service-b → service-c"
    assert "did not answer within 1 s" in problem["reason"]
    assert elapsed < 3, f"504 took {elapsed:.1f} s"


# ── a small soak ───────────────────────────────────────────────────────────────────────────────────────


# Past warm-up, 400 requests put a leak of a connection per request far past FD_BOUND, and one of over 41 KB
# past RSS_BOUND_KB; `make test-full` sends 1,000 (and `make soak` 10,000).
SOAK_REQUESTS = 1000 if FULL_MATRIX else 400


def test_small_soak_has_no_errors_and_flat_resources(own_mesh: tuple[Mesh, list]) -> None:
    mesh, processes = own_mesh
    result = soak(processes, mesh.layout, total=SOAK_REQUESTS, concurrency=32, max_seconds=120)
    print(result.report())
    assert result.errors == []
    assert result.requests == SOAK_REQUESTS
    assert result.flat(), result.report()


# ── what a caller's input and a callee's answer may cost ───────────────────────────────────────────────


class Flood(Tarpit):
    """A TLS server with service-c's real certificate that answers every request with `chunk` repeated to `size`
    bytes, declared (Content-Length) or not (chunked), until the caller stops reading."""

    def __init__(self, layout: Layout, size: int) -> None:
        super().__init__(layout)
        self.size, self.chunk, self.declared = size, b"x" * (1 << 20), False

    def _run(self) -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            framing = f"Content-Length: {self.size}" if self.declared else "Transfer-Encoding: chunked"
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode())
            chunk = self.chunk
            frame = chunk if self.declared else b"%x\r\n%b\r\n" % (len(chunk), chunk)
            with contextlib.suppress(OSError):
                for _ in range(self.size // len(chunk)):
                    if writer.transport.is_closing():
                        break
                    writer.write(frame)
                    await writer.drain()
                writer.write(b"" if self.declared else b"0\r\n\r\n")  # a complete answer, just a huge one
                await writer.drain()
            writer.close()

        async def serve() -> None:
            self.server = await asyncio.start_server(answer, "127.0.0.1", self.port, ssl=self.context)
            self.ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self.server.serve_forever()

        self.loop.run_until_complete(serve())


def peak_rss_kb(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM): what a body held in memory once cost it."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))


def test_a_callee_answering_too_much_or_nonsense_is_a_502_and_costs_the_caller_no_memory(
    layout: Layout, tmp_path: Path
) -> None:
    """A rigged service-c answers 48 MB of nothing, chunked, then declared: B stops reading at its bound and answers
    502 naming the hop, and B's memory never grew by anything like the body. Then it answers 200 with no JSON, or
    JSON without the hops of a chain: a 502 naming the hop too, never a 500 (or a 200 passing it on)."""
    skip_unless_pinned(layout)  # what a callee may send does not depend on the allow-list mode
    size = 48 << 20
    with Flood(layout, size) as flood:
        [b_port] = free_ports(1)
        [env] = chain_environments([b_port, flood.port], layout.out, names=["service-b", "service-c"])[:1]
        with running(start_services([env], tmp_path)) as processes:
            b = Service(processes[0])
            context = attacker_context(layout.ca_cert, Credentials(layout.cert("service-a"), layout.key("service-a")))
            peak_before = peak_rss_kb(processes[0].process.pid)  # type: ignore[union-attr]
            started = time.monotonic()
            chunked = get(f"{b.url}/chain", "service-b", context)
            chunked_seconds = time.monotonic() - started  # no goodbye to a flooding callee: its connection is cut
            flood.declared = True
            declared = get(f"{b.url}/chain", "service-b", context)
            grown_kb = peak_rss_kb(processes[0].process.pid) - peak_before  # type: ignore[union-attr]
            nonsense = {}
            for body in (b"not JSON", b'["hops"]', b'{"hops": "none"}'):
                flood.chunk, flood.size = body, len(body)
                nonsense[body] = get(f"{b.url}/chain", "service-b", context)
            b.assert_alive()
    for response in (chunked, declared):
        assert response.status_code == 502, response.text
        assert response.json()["hop"] == "service-b → service-c"
        assert "more than" in response.json()["reason"] and "bytes" in response.json()["reason"]
    assert grown_kb < (size >> 10) // 4, f"B's peak memory grew by {grown_kb} KB for a {size >> 20} MB answer"
    assert chunked_seconds < 0.8, f"B waited {chunked_seconds:.2f} s to close the flooding connection politely"
    for body, response in nonsense.items():
        assert response.status_code == 502, (body, response.text)
        assert response.json()["hop"] == "service-b → service-c"
    assert "not JSON" in nonsense[b"not JSON"].json()["reason"]
    assert "without the hops" in nonsense[b'{"hops": "none"}'].json()["reason"]


def test_a_retired_connection_never_cuts_a_call_already_on_it(layout: Layout) -> None:
    """The trust clock retires every connection to a callee at once (its old certificate has just expired,
    services.reloader), while one call is busy on one of them and the pool has just handed another to a new call.
    However the pool's closing of the retired ones interleaves with that new call, the call is answered: it never
    has its connection closed under it after the callee took it (as a renewal once did, 1 call in ~10,000)."""
    skip_unless_pinned(layout)  # the calling side's pool does not depend on the allow-list mode
    live_a, live_b = tls.LiveTLS(layout.material("service-a")), tls.LiveTLS(layout.material("service-b"))
    b_id = SpiffeId("mesh.internal", "/service-b")

    async def service_b(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(0.05 if b" /slow " in head else 0)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()

    async def attempt(url: str, turns_before: int, turns_after: int) -> None:
        a_to_b = Downstream("service-a", "service-b", url, live_a.client, 5.0, b_id, recheck=live_a.recheck)
        await asyncio.gather(a_to_b.get_json("/slow"), a_to_b.get_json("/slow"))  # two idle connections
        busy = await a_to_b.transport.handle_async_request(
            httpx.Request("GET", f"{url}/busy", extensions={"sni_hostname": "service-b"})
        )  # one busy: its answer's head read, its body not yet
        new_call = asyncio.create_task(a_to_b.get_json("/slow"))  # handed the idle one
        for _ in range(turns_before):
            await asyncio.sleep(0)
        nativetls.retire_where(lambda callee: True)  # the tick
        for _ in range(turns_after):
            await asyncio.sleep(0)
        await busy.aread()  # the busy call ends; its pool closes what is idle and retired
        try:
            assert await new_call == {}
        finally:
            await a_to_b.aclose()

    async def main() -> None:
        server = await asyncio.start_server(service_b, "127.0.0.1", 0, ssl=live_b.server)
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            for turns_before, turns_after in itertools.product(range(4), range(4)):
                await attempt(url, turns_before, turns_after)
        finally:
            server.close()

    uvloop.run(main())


def b_calling_c(callee: Callable[[httpx.Request], Awaitable[httpx.Response]], timeout: float = 5) -> Downstream:
    """service-b's Downstream to service-c, answered in-process by `callee`."""
    return Downstream(
        "service-b",
        "service-c",
        "https://service-c",
        ssl.create_default_context(),
        timeout,
        SpiffeId("mesh.internal", "/service-c"),
        connect=lambda *_: httpx.MockTransport(callee),
    )


def test_a_compressed_answer_is_refused_unread() -> None:
    """We ask for no compression (a few KB of gzip can inflate to gigabytes in one chunk, past the bound we count):
    a callee that compresses anyway is refused, 502 naming the hop, without inflating a byte."""
    bomb = gzip.compress(b"{}" + b" " * (8 << 20))

    async def callee(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept-encoding"] == "identity"
        return httpx.Response(200, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(bomb))

    downstream = b_calling_c(callee)
    with pytest.raises(Problem) as refused:
        asyncio.run(downstream.get_json("/chain"))
    assert refused.value.status == 502 and refused.value.extra["hop"] == "service-b → service-c"
    assert "Content-Encoding 'gzip'" in refused.value.extra["reason"]


def test_a_callee_that_drips_its_answer_is_cut_off_at_the_timeout() -> None:
    """httpx's timeouts are per read: a callee that sends one byte every 50 ms never trips them. The call as a
    whole is bounded — 504 naming the hop, at the timeout, not when the callee is done."""

    class Drip(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for _ in range(200):  # 10 s of answer
                await asyncio.sleep(0.05)
                yield b" "

    async def callee(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Drip())

    downstream = b_calling_c(callee, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(Problem) as refused:
        asyncio.run(downstream.get_json("/chain"))
    assert time.monotonic() - started < 3
    assert refused.value.status == 504 and refused.value.extra["hop"] == "service-b → service-c"
    assert refused.value.extra["reason"] == "service-c did not answer within 0.5 s"


def test_a_cookie_a_callee_sets_is_never_sent_on() -> None:
    """A service keeps no cookies: one a callee set during one user's call would ride along on the next user's."""
    sent: list[str | None] = []

    async def callee(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("cookie"))
        return httpx.Response(
            200, headers={"set-cookie": "session=alice; Path=/"}, stream=httpx.ByteStream(b'{"hops": []}')
        )

    downstream = b_calling_c(callee)

    async def two_calls() -> None:
        for _ in range(2):
            assert await downstream.get_json("/chain") == {"hops": []}

    asyncio.run(two_calls())
    assert sent == [None, None]


def test_a_cut_off_request_body_is_one_info_line_not_a_traceback(token_mesh: Mesh) -> None:
    """A caller declares 1,000 bytes of body, sends 11 and hangs up: the token service, which reads the body of
    every POST /token, logs one INFO line and no error (any allow-listed caller could otherwise fill its log)."""
    tokens = token_mesh["token-service"]
    context = attacker_context(token_mesh.layout.ca_cert, token_mesh.credentials("client"))
    mark = tokens.mark()
    with (
        socket.create_connection(("127.0.0.1", tokens.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="token-service") as conn,
    ):
        head = "POST /token HTTP/1.1\r\nHost: token-service\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        conn.sendall(f"{head}Content-Length: 1000\r\n\r\ngrant_type=".encode())
        wait_until(lambda: tokens.events_since(mark, "authz") != [])  # the route is reading the body now
    wait_until(
        lambda: tokens.events_since(mark, "client_disconnected") != [], describe=lambda: str(tokens.events_since(mark))
    )
    # A request after it: once it is logged, whatever the cut-off one was going to log is logged too.
    assert post_token(tokens.url, context, {"grant_type": "none"}).status_code == 400
    wait_until(lambda: tokens.events_since(mark, "token_refused") != [])
    assert len(tokens.events_since(mark, "token_refused")) == 1  # the request after it: the cut-off one got nowhere
    assert tokens.events_since(mark, "token_granted") == []
    [disconnected] = tokens.events_since(mark, "client_disconnected")
    assert disconnected["level"] == "info" and "exception" not in disconnected
    assert [e for e in tokens.events_since(mark) if e["level"] not in ("info", "debug") or "exception" in e] == []
    tokens.assert_alive()


ECHOED = 60_000  # characters: just under the 64 KB body limit


@pytest.mark.parametrize("field", ["grant_type", "user", "audience", "scope"])
def test_refusals_do_not_echo_the_callers_input(token_mesh: Mesh, field: str) -> None:
    """60,000 characters in one field of POST /token: the refusal quotes at most its first 200, in the answer and
    in the log alike."""
    tokens = token_mesh["token-service"]
    context = attacker_context(token_mesh.layout.ca_cert, token_mesh.credentials("client"))
    form = {"grant_type": USER_GRANT, "user": "alice", "audience": "service-a", "scope": "service-a"}
    form[field] = "x" * ECHOED
    mark = tokens.mark()
    response = post_token(tokens.url, context, form)
    assert response.status_code == 400, response.text
    assert "x" * 200 in response.text and "x" * 201 not in response.text
    assert "60000 characters" in response.json()["error_description"]
    [logged] = tokens.events_since(mark, "token_refused")
    assert len(json.dumps(logged)) < 2_000
    assert tokens.events_since(mark, "token_granted") == []


def test_a_service_refusing_a_token_does_not_echo_it(token_mesh: Mesh) -> None:
    """A token with a 250-character `typ` (joserfc reads headers up to 512 bytes), signed with the token service's
    key: A's 401 quotes 200 characters of it, and B and C see nothing."""
    key = token_mesh.signing_key  # type: ignore[attr-defined]
    client = identity_of(token_mesh.credentials("client"))
    token = forge(key, {"alg": "ES256", "typ": "y" * 250, "kid": key.kid}, token_claims(client, "service-a"))
    marks = token_mesh.marks()
    context = attacker_context(token_mesh.layout.ca_cert, token_mesh.credentials("client"))
    response = get(f"{token_mesh['service-a'].url}/chain", "service-a", context, token)
    assert response.status_code == 401, response.text
    assert "y" * 200 in response.json()["reason"] and "y" * 201 not in response.text
    [logged] = token_mesh["service-a"].events_since(marks["service-a"], "user_token")
    assert "y" * 201 not in json.dumps(logged)
    assert token_mesh.events_since(marks, "authz")["service-b"] == []
    assert token_mesh.events_since(marks, "authz")["service-c"] == []
