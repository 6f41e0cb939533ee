"""`make view` against the real mesh: recent decisions from every layer, and the page in a real browser.

The browser is Debian's `chromium`, headless, driven from the command line (--dump-dom, --screenshot): no
driver, no download. The page is judged by the DOM its script built from what the view read, after a chain
call and two attacks: a self-signed certificate at A (refused by TLS) and the client straight at C (refused
by C's allow-list). Script errors fail the test: the page's own window.onerror writes them into the DOM,
and Chromium's console log (which also reports a Content-Security-Policy violation, i.e. an external
resource) is read from its stderr.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cockpit.collect import MeshStatus, Reference
from pki.policy import Policy
from services.local import free_ports
from shared.layout import Layout
from shared.observability.decisions import DecisionRing, tls_code, token_code
from tests.support import TLS_REFUSALS, Credentials, Mesh, attacker_context, get, once_for_both_modes, wait_until
from view.watch import Watch

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "view.png"


# ── the ring, in-process ────────────────────────────────────────────────────────────────────────────────────


def test_ring_keeps_the_newest_and_numbers_them() -> None:
    ring = DecisionRing(3)
    for i in range(5):
        ring.record("allow-list", "deny", f"refusal {i}", "not_listed")
    entries, last = ring.since(0)
    assert [d.reason for d in entries] == ["refusal 2", "refusal 3", "refusal 4"]  # bounded: the oldest went
    assert [d.seq for d in entries] == [3, 4, 5] and last == 5  # a reader that had 1 sees the gap
    assert ring.since(4)[0][0].reason == "refusal 4"


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_certificate"),
        ("unable to get local issuer certificate", "unknown_ca"),
        ("self-signed certificate", "unknown_ca"),
        ("certificate has expired", "expired"),
        ("certificate revoked", "revoked"),
        ("CRL has expired", "crl_expired"),
        ("unsupported certificate purpose", "wrong_purpose"),
        ("UNSUPPORTED_PROTOCOL", "old_tls"),
    ],
)
def test_tls_reasons_have_codes(reason: str, code: str) -> None:
    assert tls_code(reason) == code


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("service-a requires a user token (Authorization: Bearer …); none was sent", "missing"),
        ("the token is for service-b, not for service-a", "audience"),
        ("the token's holder (act.sub) is spiffe://x/a, not the caller spiffe://x/b", "cnf"),
        ("the token is bound to no certificate (cnf.x5t#S256): a bearer token is not accepted", "cnf"),
        ("alice may not reach service-c: it is not in the token's scope (service-a)", "scope"),
        ("the token expired 3 s ago", "expired"),
    ],
)
def test_token_reasons_have_codes(reason: str, code: str) -> None:
    assert token_code(reason) == code


# ── the view's counting, in-process (httpx.MockTransport answers for the services) ───────────────────────────


def test_the_view_counts_per_edge_from_the_decisions_it_reads() -> None:
    rings: dict[str, list[dict[str, Any]]] = {"service-a": [], "service-c": []}

    def answer(request: httpx.Request) -> httpx.Response:
        service = request.url.host
        after = int(request.url.params["after"])
        ring = rings[service]
        return httpx.Response(200, json={"last": len(ring), "decisions": [d for d in ring if d["seq"] > after]})

    def add(service: str, layer: str, verdict: str, code: str, caller: str | None, seq: int | None = None) -> None:
        ring = rings[service]
        entry = {"layer": layer, "verdict": verdict, "code": code, "reason": f"{layer} {code}", "caller": caller}
        ring.append({**entry, "seq": seq or len(ring) + 1, "time": 0.0, "peer": None})

    transport = httpx.MockTransport(answer)
    clients = {name: httpx.Client(base_url=f"https://{name}", transport=transport) for name in rings}
    empty = MeshStatus(dt.datetime.now(dt.UTC), (), Reference(Path("."), (), (), {}, {}))
    watch = Watch(clients, Policy.load(), lambda: empty)
    client, intruder = "spiffe://mesh.internal/client", "spiffe://elsewhere.example/intruder"
    add("service-a", "allow-list", "allow", "listed", client)  # before the view started: not counted
    watch.poll()
    add("service-a", "allow-list", "allow", "listed", client)
    add("service-a", "allow-list", "allow", "listed", client)  # admitted, then refused for its token:
    add("service-a", "token", "deny", "missing", client)  # one request that did not get through
    add("service-a", "tls", "deny", "unknown_ca", None)
    add("service-c", "allow-list", "deny", "not_listed", intruder)
    watch.poll()
    state = watch.state()
    assert edge(state, "client", "service-a") | {"reasons": None} == {
        "caller": "client",
        "callee": "service-a",
        "in_policy": True,
        "allowed": 1,
        "refused": {"token/missing": 1},
        "reasons": None,
        "red": True,
    }
    assert edge(state, "unverified", "service-a")["refused"] == {"tls/unknown_ca": 1}
    assert not edge(state, intruder, "service-c")["in_policy"]  # a caller from elsewhere keeps its whole name
    assert len(state["feed"]) == 5 and not state["missed"]
    add("service-c", "allow-list", "deny", "not_listed", intruder, seq=5)  # the ring dropped 3 between two reads
    watch.poll()
    assert watch.state()["missed"] == {"service-c": 3}


# ── GET /decisions on the real mesh ─────────────────────────────────────────────────────────────────────────


def decisions(mesh: Mesh, service: str, as_who: str = "operator", after: int = 0) -> httpx.Response:
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials(as_who))
    return get(f"{mesh[service].url}/decisions?after={after}", service, context)


def test_decisions_show_every_layer_to_the_operator_only(
    mesh: Mesh, token_mesh: Mesh, hostile: dict[str, Credentials]
) -> None:
    once_for_both_modes(mesh.layout)
    before = decisions(mesh, "service-a").json()["last"]
    client = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    for attacker in ("expired", "self-signed"):
        with pytest.raises(TLS_REFUSALS):
            get(f"{mesh['service-a'].url}/chain", "service-a", attacker_context(mesh.layout.ca_cert, hostile[attacker]))
    with pytest.raises(TLS_REFUSALS):
        get(f"{mesh['service-a'].url}/chain", "service-a", attacker_context(mesh.layout.ca_cert, None))
    assert get(f"{mesh['service-a'].url}/chain", "service-a", client).status_code == 200
    assert get(f"{mesh['service-c'].url}/chain", "service-c", client).status_code == 403

    answer = decisions(mesh, "service-a", after=before).json()
    seen = {(d["layer"], d["verdict"], d["code"], d["caller"]) for d in answer["decisions"]}
    client_id = "spiffe://mesh.internal/client"
    assert {
        ("tls", "deny", "expired", None),
        ("tls", "deny", "unknown_ca", None),
        ("tls", "deny", "no_certificate", None),
    } <= seen
    assert any(d[:2] == ("allow-list", "allow") and d[3] == client_id for d in seen)
    refused_at_c = [d for d in decisions(mesh, "service-c").json()["decisions"] if d["verdict"] == "deny"]
    assert refused_at_c[-1]["layer"] == "allow-list" and refused_at_c[-1]["caller"] == client_id
    assert all(d["peer"] for d in answer["decisions"] if d["layer"] == "tls")  # where a refused handshake came from
    # The operator's own reads are not kept (a view polling every second would push everything else out).
    assert not any(d["caller"] == "spiffe://mesh.internal/operator" for d in answer["decisions"])

    # The token layer, on the mesh that requires user tokens: a request without one, and one with a bad token.
    token_a = token_mesh["service-a"]
    assert get(f"{token_a.url}/chain", "service-a", client).status_code == 401
    secret = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2VjcmV0LXNpZ25hdHVyZQ"
    assert get(f"{token_a.url}/chain", "service-a", client, token=secret).status_code == 401
    ring = decisions(token_mesh, "service-a").json()["decisions"]
    assert ("token", "deny", "missing", client_id) in {(d["layer"], d["verdict"], d["code"], d["caller"]) for d in ring}
    assert ring[-1]["layer"] == "token" and ring[-1]["verdict"] == "deny"
    assert "c2VjcmV0" not in str(ring) and "eyJzdWIi" not in str(ring)  # no token, not even in part

    # Who calls whom is for the operator: the client itself is refused.
    assert decisions(mesh, "service-a", as_who="client").status_code == 403


# ── the view and the browser ────────────────────────────────────────────────────────────────────────────────


@pytest.fixture
def view(mesh: Mesh) -> Iterator[dict[str, Any]]:
    """`python -m view` on the test mesh, as a real process; its URL (with the token) read from its output."""
    targets = [f"{name}={service.url}" for name, service in mesh.services.items()]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "view",
            *targets,
            "--pki-dir",
            str(mesh.layout.out),
            "--port",
            str(free_ports(1)[0]),
            "--red-seconds",
            "60",
        ],  # red long enough for a slow machine's browser to see it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the first line is the URL, or the reason it could not start
        match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line)
        assert match, f"the view did not print its URL: {line}{process.stdout.read() if process.poll() else ''}"
        url = match.group(0)
        yield {"url": url, "base": url.split("/?")[0], "token": url.split("token=")[1], "process": process}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def state(view: dict[str, Any]) -> dict[str, Any]:
    return httpx.get(f"{view['base']}/state", params={"token": view["token"]}, timeout=5).json()


def edge(snapshot: dict[str, Any], caller: str, callee: str) -> dict[str, Any]:
    return next((e for e in snapshot["edges"] if (e["caller"], e["callee"]) == (caller, callee)), {})


def chromium(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # as root (CI containers) Chromium refuses to start with its sandbox
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=4000",  # the page's script runs: 4 refreshes of /state
            "--window-size=1180,1350",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=25,
    )


def test_the_page_shows_the_chain_and_both_attacks(
    mesh: Mesh, hostile: dict[str, Credentials], view: dict[str, Any], tmp_path: Path
) -> None:
    once_for_both_modes(mesh.layout)
    base, token = view["base"], view["token"]
    # The token is the key: no token, a wrong one, or a foreign Host header gets a 403 and nothing else.
    for params, headers in [({}, {}), ({"token": "x" * len(token)}, {}), ({"token": token}, {"Host": "evil.example"})]:
        for path in ("/", "/state"):
            refused = httpx.get(base + path, params=params, headers=headers, timeout=5)
            assert refused.status_code == 403 and refused.text == "forbidden\n"
    wait_until(lambda: state(view)["ready"], 15, lambda: str(state(view)["errors"]))

    layout: Layout = mesh.layout
    client = attacker_context(layout.ca_cert, mesh.credentials("client"))
    assert get(f"{mesh['service-a'].url}/chain", "service-a", client).status_code == 200
    with pytest.raises(TLS_REFUSALS):
        get(f"{mesh['service-a'].url}/chain", "service-a", attacker_context(layout.ca_cert, hostile["self-signed"]))
    assert get(f"{mesh['service-c'].url}/chain", "service-c", client).status_code == 403

    def shown() -> bool:
        s = state(view)
        return (
            edge(s, "service-b", "service-c").get("allowed") == 1
            and "tls/unknown_ca" in edge(s, "unverified", "service-a").get("refused", {})
            and "allow-list/not_listed" in edge(s, "client", "service-c").get("refused", {})
        )

    wait_until(shown, 10, lambda: str(state(view)["edges"]))
    snapshot = state(view)
    assert edge(snapshot, "client", "service-a")["allowed"] == 1
    assert edge(snapshot, "service-a", "service-b")["allowed"] == 1
    assert not edge(snapshot, "client", "service-c")["in_policy"]
    assert edge(snapshot, "unverified", "service-a")["red"]  # red for a few seconds after the refusal

    if CHROMIUM is None:
        pytest.skip("no Chromium to load the page in: apt-get install -y chromium")
    page = chromium("--dump-dom", url=view["url"])
    dom, console = page.stdout, page.stderr
    assert 'data-ready="yes"' in dom, f"the page never read the view's state: {console[-2000:]}"
    status = re.search(r'<div id="status"([^>]*)>(.*?)</div>', dom)
    assert status and "bad" not in status.group(1) and status.group(2).startswith("live"), status and status.group(0)
    errors = [line for line in console.splitlines() if "CONSOLE" in line or "Uncaught" in line or "Refused to" in line]
    assert not errors, f"the page logged errors: {errors}"

    def row(caller: str, callee: str) -> str:
        found = re.search(rf'<tr data-edge="{caller}-&gt;{callee}"[^>]*>(.*?)</tr>', dom)
        assert found, f"no row for {caller} → {callee} in the page"
        return found.group(1)

    assert "<td>1</td>" in row("client", "service-a") and "<td>0</td>" in row("client", "service-a")
    assert "<td>1</td>" in row("service-b", "service-c")
    self_signed = row("unverified", "service-a")
    assert "tls/unknown_ca ×1" in self_signed and "self-signed certificate" in self_signed
    straight_at_c = row("client", "service-c")
    assert "allow-list/not_listed ×1" in straight_at_c and "not on the allow-list" in straight_at_c
    assert "not in the policy" in straight_at_c
    assert re.search(r'data-label="unverified-&gt;service-a"', dom)  # drawn in the graph, too
    assert re.search(r'class="edge off red"[^>]*data-edge="unverified-&gt;service-a"', dom)
    assert re.search(r'class="edge"[^>]*data-edge="client-&gt;service-a"', dom)  # not red: nothing refused
    assert "spiffe://mesh.internal/service-b" in dom and "expires in" in dom  # the nodes' certificates

    shot = tmp_path / "view.png"
    taken = chromium(f"--screenshot={shot}", url=view["url"])
    assert shot.exists() and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    if os.environ.get("MESH_UPDATE_SCREENSHOT") == "1":  # docs/view.png is this picture
        shutil.copyfile(shot, SCREENSHOT)
