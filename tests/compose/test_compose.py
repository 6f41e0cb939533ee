"""The compose stack against a real Docker engine: built, started, attacked from the host and from inside.

Skipped with a visible reason when no engine answers — unless MESH_REQUIRE_DOCKER=1 (as in CI), where
that is a failure. Each run uses its own compose project, ports and PKI directory, and is torn down even
when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pki import Policy, issue_identity, revoke
from shared.certs import load_certificates, thumbprint
from shared.layout import Layout
from tests.support import TLS_REFUSALS, Credentials, attacker_context, free_ports, get, wait_until

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["service-a", "service-b", "service-c"]
UIDS = {"service-a": "10001", "service-b": "10002", "service-c": "10003", "client": "10004"}


def docker_available() -> str | None:
    """None if a Docker engine and Compose v2 answer; otherwise why not."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine is running (docker info failed)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "Docker Compose v2 (`docker compose`) is not installed"
    return None


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.project = f"mtls-mesh-test-{uuid.uuid4().hex[:8]}"
        self.pki = tmp / "pki"
        self.pki.mkdir()
        self.ports = dict(zip(SERVICES, free_ports(3), strict=True))
        self.env = {
            **os.environ,
            "MESH_HOST_PKI": str(self.pki),
            "MESH_PORT_A": str(self.ports["service-a"]),
            "MESH_PORT_B": str(self.ports["service-b"]),
            "MESH_PORT_C": str(self.ports["service-c"]),
        }
        self.layout = Layout(self.pki)

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        # The one-shot client is in a profile of its own: `up --wait` would report it as "exited (0)" and fail.
        # `run client` names it, which is enough; `down` gets the profile, so that nothing is left behind.
        profile = ["--profile", "client"] if args[0] == "down" else []
        command = ["docker", "compose", "-p", self.project, *profile, *args]
        result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def url(self, service: str, path: str = "/chain") -> str:
        return f"https://127.0.0.1:{self.ports[service]}{path}"

    def credentials(self, name: str) -> Credentials:
        return Credentials(self.layout.cert(name), self.layout.key(name))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if reason := docker_available():
        if os.environ.get("MESH_REQUIRE_DOCKER") == "1":
            pytest.fail(f"MESH_REQUIRE_DOCKER=1 but {reason}")
        pytest.skip(f"compose tests need Docker: {reason}")
    subprocess.run(["make", "image"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    stack = Stack(tmp_path_factory.mktemp("compose"))
    try:
        stack.compose("up", "-d", "--wait")
        yield stack
    finally:
        if os.environ.get("MESH_KEEP_STACK") != "1":
            stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)


def test_the_chain_works_from_the_host(stack: Stack) -> None:
    context = attacker_context(stack.layout.ca_cert, stack.credentials("client"))
    response = get(stack.url("service-a"), "service-a", context)
    assert response.status_code == 200, response.text
    hops = response.json()["hops"]
    assert [h["service"] for h in hops] == SERVICES
    for hop, caller in zip(hops, ["client", "service-a", "service-b"], strict=True):
        assert hop["caller"]["sha256"] == thumbprint(load_certificates(stack.layout.cert(caller))[0])


def test_the_client_container_prints_the_hop_table(stack: Stack) -> None:
    result = stack.compose("run", "--rm", "-T", "client")
    assert "client → service-a → service-b → service-c: 3 hops" in result.stdout


@pytest.mark.parametrize("service", ["service-b", "service-c"])
def test_direct_calls_to_b_and_c_are_403(stack: Stack, service: str) -> None:
    context = attacker_context(stack.layout.ca_cert, stack.credentials("client"))
    response = get(stack.url(service), service, context)
    assert response.status_code == 403
    assert response.json()["service"] == service
    logs = stack.compose("logs", "--no-log-prefix", service).stdout
    assert '"decision": "deny"' in logs


def test_no_certificate_is_refused(stack: Stack) -> None:
    with pytest.raises(TLS_REFUSALS):
        get(stack.url("service-a"), "service-a", attacker_context(stack.layout.ca_cert, None))


def test_all_services_are_healthy_and_not_root(stack: Stack) -> None:
    for service in SERVICES:
        container = stack.container(service)
        state = json.loads(
            subprocess.run(
                ["docker", "inspect", "--format", "{{json .State}}", container],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert state["Health"]["Status"] == "healthy", service
        uid = stack.compose("exec", "-T", service, "id", "-u").stdout.strip()
        assert uid == UIDS[service], f"{service} runs as uid {uid}"


LIST_PKI = """
import json, os, sys
files = {}
for root, _, names in os.walk("/pki"):
    for name in names:
        path = os.path.join(root, name)
        info = os.stat(path)
        files[os.path.relpath(path, "/pki")] = [oct(info.st_mode & 0o777), info.st_uid]
print(json.dumps(files))
"""


@pytest.mark.parametrize("identity", [*SERVICES, "client"])
def test_each_container_holds_its_own_key_and_no_other(stack: Stack, identity: str) -> None:
    """Compromising one container yields one identity: its volume has its own key (0600, its uid) only."""
    command = ["python", "-c", LIST_PKI]
    if identity == "client":
        result = stack.compose("run", "--rm", "-T", "--no-deps", "client", *command)
    else:
        result = stack.compose("exec", "-T", identity, *command)
    files = json.loads(result.stdout.strip().splitlines()[-1])
    keys = {name: mode_and_owner for name, mode_and_owner in files.items() if name.endswith(".key")}
    assert keys == {f"{identity}.key": ["0o600", int(UIDS[identity])]}
    allow_lists = {name for name in files if name.startswith("allow/")}
    assert allow_lists == ({f"allow/{identity}.txt", "allow/metrics.txt"} if identity in SERVICES else set())
    assert {"ca.crt", "crl.pem", f"{identity}.crt"} <= set(files)


def test_service_a_and_service_c_share_no_network(stack: Stack) -> None:
    def networks(service: str) -> set[str]:
        out = subprocess.run(
            ["docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", stack.container(service)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return set(json.loads(out))

    assert networks("service-a") & networks("service-c") == set()
    assert networks("service-c") == {f"{stack.project}_bc"}


PROBE = """
import json, socket, sys
result = {}
for name in ("service-a", "service-c"):
    try:
        socket.getaddrinfo(name, 8443)
        result[name + " resolves"] = True
    except socket.gaierror:
        result[name + " resolves"] = False
for label, address in (("service-a", "service-a"), ("service-c address", sys.argv[1])):
    try:
        socket.create_connection((address, 8443), timeout=3).close()
        result[label + " reachable"] = True
    except OSError:
        result[label + " reachable"] = False
print(json.dumps(result))
"""


def test_a_container_on_edge_can_neither_resolve_nor_reach_service_c(stack: Stack) -> None:
    c_address = subprocess.run(
        [
            "docker",
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            stack.container("service-c"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    result = stack.compose("run", "--rm", "-T", "--no-deps", "client", "python", "-c", PROBE, c_address)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "service-a resolves": True,  # the probe works: what should be visible is
        "service-c resolves": False,
        "service-a reachable": True,
        "service-c address reachable": False,
    }


def test_revoking_an_identity_reaches_the_containers(stack: Stack) -> None:
    """A fresh identity of its own (so that no other test depends on when this one runs) is revoked on the
    host; `make revoke` then runs the pki job, which deploys the new CRL into every container's volume."""
    issue_identity(stack.layout, Policy.load(), "revoked-probe", client_only=True)
    context = attacker_context(stack.layout.ca_cert, stack.credentials("revoked-probe"))
    assert get(stack.url("service-a", "/healthz"), "service-a", context).status_code == 200
    revoke(stack.layout, "revoked-probe", "key-compromise")
    stack.compose("run", "--rm", "--no-deps", "-T", "pki")  # what `make revoke` does when the stack is up

    def refused() -> bool:
        try:
            get(stack.url("service-a", "/healthz"), "service-a", context)
        except TLS_REFUSALS:
            return True
        return False

    wait_until(refused, timeout=10)
