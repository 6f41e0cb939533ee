"""Revocation and live rotation against a running mesh: nothing is restarted in any of these tests.

Each test that changes the PKI for good (a revocation, a rotation) gets its own PKI and its own three processes;
those that put back what they break share one mesh (`restored_mesh`): a start costs seconds on 2 cores.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pki import ROTATION_GRACE, Policy, init, revoke, rotate_begin, rotate_finish
from services.local import chain_environments, running
from shared import tls
from shared.layout import Layout
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

RELOAD_INTERVAL = 0.5
# The documented bound: a service notices new material within one reload interval; allow for slow CI.
BOUND = RELOAD_INTERVAL + 2.5


def own_mesh(directory: Path) -> Iterator[Mesh]:
    layout = Layout(directory / "pki")
    init(layout)
    envs = chain_environments(free_ports(3), layout.out, MESH_RELOAD_INTERVAL=str(RELOAD_INTERVAL))
    processes = start_services(envs, directory)
    with running(processes):
        yield Mesh([Service(p) for p in processes], layout)


@pytest.fixture
def fresh_mesh(tmp_path: Path) -> Iterator[Mesh]:
    yield from own_mesh(tmp_path)


@pytest.fixture(scope="module")
def restored_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """For the tests that restore every file they break, and wait until the mesh has taken it back."""
    yield from own_mesh(tmp_path_factory.mktemp("restored"))


def client_context(mesh: Mesh, *, check_revocation: bool = False) -> ssl.SSLContext:
    """The client identity; without revocation checks unless asked, to see what the services decide."""
    if check_revocation:
        material = tls.TLSMaterial(
            mesh.layout.ca_cert, mesh.layout.cert("client"), mesh.layout.key("client"), mesh.layout.crl
        )
        return tls.client_context(material)
    return attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))


def chain(mesh: Mesh, context: ssl.SSLContext | None = None) -> httpx.Response:
    return get(f"{mesh['service-a'].url}/chain", "service-a", context or client_context(mesh))


def events(service: Service, name: str) -> list[dict]:
    return [e for e in service.events() if e.get("event") == name]


def test_revoking_service_a_makes_b_refuse_it(fresh_mesh: Mesh) -> None:
    mesh = fresh_mesh
    assert chain(mesh).status_code == 200  # A now holds a pooled connection to B
    revoke(mesh.layout, "service-a", "key-compromise")

    answers: list[str] = []  # what came back meanwhile, should it never be the 502

    def refused() -> bool:
        response = chain(mesh)
        answers.append(f"{response.status_code} {response.text[:200]}")
        return response.status_code == 502

    elapsed = wait_until(refused, describe=lambda: f"last answers: {answers[-3:]}")
    assert elapsed < BOUND
    problem = chain(mesh).json()
    assert problem["hop"] == "service-a → service-b"
    assert "refused our client certificate at the TLS layer" in problem["reason"]
    # A client that checks revocation itself does not even get to A: its certificate is revoked too.
    with pytest.raises(httpx.ConnectError, match="certificate revoked"):
        chain(mesh, client_context(mesh, check_revocation=True))


def test_revoking_the_client_cuts_its_open_connection(fresh_mesh: Mesh) -> None:
    mesh = fresh_mesh
    url = f"{mesh['service-a'].url}/chain"
    with httpx.Client(verify=client_context(mesh), timeout=5) as client:

        def still_allowed() -> bool:
            try:
                return client.get(url, extensions={"sni_hostname": "service-a"}).status_code == 200
            except TLS_REFUSALS:
                return False

        assert still_allowed()  # the keep-alive connection is open, its handshake long done
        revoke(mesh.layout, "client")
        elapsed = wait_until(lambda: not still_allowed())
    assert elapsed < BOUND

    def closed_by_a() -> bool:  # the log line follows the close by a moment: wait for it, briefly
        reloads = events(mesh["service-a"], "reloaded")
        return any(e.get("revoked_connections_closed", 0) >= 1 for e in reloads)

    wait_until(closed_by_a, timeout=3)
    with pytest.raises(TLS_REFUSALS):
        chain(mesh)  # and a new connection is refused at the handshake


def test_revoking_service_b_makes_a_refuse_to_call_it(fresh_mesh: Mesh) -> None:
    """The caller's own CRL check: A refuses B's certificate — B and C never see the request."""
    mesh = fresh_mesh
    assert chain(mesh).status_code == 200
    revoke(mesh.layout, "service-b")
    # Until A has re-read the CRL, C (which has) may be the one refusing B: wait for A's own refusal.
    wait_until(lambda: chain(mesh).json().get("hop") == "service-a → service-b")

    marks = mesh.marks()
    problem = chain(mesh).json()
    assert problem["hop"] == "service-a → service-b"
    assert "failed our check that it is service-b: certificate revoked" in problem["reason"]
    seen = mesh.events_since(marks)
    assert seen["service-b"] == [] and seen["service-c"] == [], "A's decision, not B's or C's"


def test_rotating_service_b_under_load_fails_no_request(fresh_mesh: Mesh) -> None:
    mesh = fresh_mesh
    policy = Policy.load()
    old = thumbprint(load_certificates(mesh.layout.cert("service-b"))[0])
    rotated = threading.Event()

    def rotate() -> None:
        time.sleep(1)
        rotate_begin(mesh.layout, policy, "service-b")
        time.sleep(ROTATION_GRACE.total_seconds())
        rotate_finish(mesh.layout, policy, "service-b")
        time.sleep(2 * RELOAD_INTERVAL + 1)  # keep the load going while B and C take the new material in
        rotated.set()

    async def load() -> tuple[int, list[str], set[str]]:
        done, failures, c_callers = 0, [], set()
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(verify=client_context(mesh), timeout=10) as client:

            async def worker() -> None:
                nonlocal done
                while (done < 500 or not rotated.is_set()) and time.monotonic() < deadline:
                    try:
                        response = await client.get(
                            f"{mesh['service-a'].url}/chain", extensions={"sni_hostname": "service-a"}
                        )
                        if response.status_code == 200:
                            c_callers.add(response.json()["hops"][2]["caller"]["sha256"])
                        else:
                            failures.append(f"{response.status_code} {response.text[:200]}")
                    except httpx.HTTPError as e:
                        failures.append(repr(e))
                    done += 1

            await asyncio.gather(*(worker() for _ in range(8)))
        return done, failures, c_callers

    rotation = threading.Thread(target=rotate)
    rotation.start()
    done, failures, c_callers = asyncio.run(load())
    rotation.join()

    new = thumbprint(load_certificates(mesh.layout.cert("service-b"))[0])
    assert new != old
    assert failures == [], failures[:5]
    assert done >= 500
    assert c_callers == {old, new}, "C should have seen B's old certificate, then its new one"
    assert chain(mesh).json()["hops"][2]["caller"]["sha256"] == new


@pytest.mark.parametrize("broken", ["mismatched key", "garbage CRL", "malformed allow-list"])
def test_broken_material_is_refused_and_the_old_stays(restored_mesh: Mesh, broken: str) -> None:
    mesh = restored_mesh
    layout = mesh.layout
    target, victim = {
        "mismatched key": (layout.key("service-b"), "service-b"),
        "garbage CRL": (layout.crl, "service-a"),
        "malformed allow-list": (layout.allow_list("service-a"), "service-a"),
    }[broken]
    backup = target.with_name(target.name + ".bak")
    shutil.copy2(target, backup)
    broken_at = mesh[victim].mark()
    if broken == "mismatched key":
        shutil.copy2(layout.key("service-c"), target)
    else:
        target.write_text("this is not what you think it is\n")

    def refusals() -> list[dict]:
        return [e for e in mesh[victim].events_since(broken_at, "reload_refused") if str(target) in str(e)]

    wait_until(lambda: bool(refusals()))
    refusal = refusals()[0]
    assert refusal["level"] == "error"
    assert chain(mesh).status_code == 200, "the last good material should still be in force"
    # Repair: the good material is taken, by the same process, without a restart.
    pid = mesh[victim].process.process.pid  # type: ignore[union-attr]
    mark = mesh[victim].mark()
    shutil.copy2(backup, target)
    wait_until(lambda: any(str(target) in str(e) for e in mesh[victim].events_since(mark, "reloaded")))
    assert chain(mesh).status_code == 200
    assert mesh[victim].process.process.pid == pid  # type: ignore[union-attr]


def test_allow_list_edits_take_effect_without_restart(restored_mesh: Mesh) -> None:
    mesh = restored_mesh
    allow_list = mesh.layout.allow_list("service-a")
    original = allow_list.read_text()
    allow_list.write_text("# nobody, for now\n")
    wait_until(lambda: chain(mesh).status_code == 403)
    assert "not on the allow-list" in chain(mesh).json()["reason"]
    allow_list.write_text(original)
    assert wait_until(lambda: chain(mesh).status_code == 200) < BOUND


def test_sighup_reloads_at_once(tmp_path: Path) -> None:
    """With a long poll interval, SIGHUP is what makes the service look. (Its own PKI and service-c alone: a
    whole mesh would only cost its start.)"""
    layout = Layout(tmp_path / "pki")
    init(layout)
    env = chain_environments(free_ports(1), layout.out, names=["service-c"], MESH_RELOAD_INTERVAL="3600")[0]
    (process,) = start_services([env], tmp_path)
    service = Service(process)
    b = Credentials(layout.cert("service-b"), layout.key("service-b"))
    with running([process]):
        context = attacker_context(layout.ca_cert, b)
        assert get(f"{service.url}/chain", "service-c", context).status_code == 200
        layout.allow_list("service-c").write_text("# nobody\n")
        time.sleep(1)
        assert get(f"{service.url}/chain", "service-c", context).status_code == 200  # not looked yet
        assert process.process is not None
        process.process.send_signal(1)  # SIGHUP
        wait_until(lambda: get(f"{service.url}/chain", "service-c", context).status_code == 403, timeout=3)
