"""The compose stack against a real Docker engine: built, started, attacked from the host and from inside.

Skipped with a visible reason when no engine answers — unless MESH_REQUIRE_DOCKER=1 (as in CI), where
that is a failure. Each run uses its own compose project, ports and PKI directory, and is torn down even
when a test fails.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from pki import Policy, issue_identity, revoke
from shared.x509 import load_certificates, thumbprint
from tests.compose.stack import CHAIN, SERVICES, Stack
from tests.support import TLS_REFUSALS, attacker_context, get, wait_until

pytestmark = pytest.mark.compose

UIDS = {"service-a": "10001", "service-b": "10002", "service-c": "10003", "client": "10004", "token-service": "10005"}


def test_the_chain_works_from_the_host(stack: Stack) -> None:
    context = attacker_context(stack.layout.ca_cert, stack.credentials("client"))
    response = get(stack.url("service-a"), "service-a", context)
    assert response.status_code == 200, response.text
    hops = response.json()["hops"]
    assert [h["service"] for h in hops] == CHAIN
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
    assert ("tokens.json" in files) == (identity == "token-service")  # the token policy: its own business


def networks(stack: Stack, service: str) -> set[str]:
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", stack.container(service)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {name.removeprefix(f"{stack.project}_") for name in json.loads(out)}


def test_service_a_and_service_c_share_no_network(stack: Stack) -> None:
    assert networks(stack, "service-a") & networks(stack, "service-c") == set()
    assert networks(stack, "service-c") == {"bc", "tokens-c"}  # tokens-c: service-c and the token service only


def test_reaching_the_token_service_opens_no_path_between_its_callers(stack: Stack) -> None:
    """Each of the token service's networks holds it and one caller: no two callers meet on them."""
    tokens = networks(stack, "token-service")
    assert tokens == {"tokens-edge", "tokens-a", "tokens-b", "tokens-c"}
    members = {name: networks(stack, name) & tokens for name in CHAIN}
    assert members == {"service-a": {"tokens-a"}, "service-b": {"tokens-b"}, "service-c": {"tokens-c"}}


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


def test_the_renewer_runs_beside_the_services_without_a_network(stack: Stack) -> None:
    container = stack.container("renewer")
    state = json.loads(
        subprocess.run(
            ["docker", "inspect", "--format", "{{json .}}", container], capture_output=True, text=True, check=True
        ).stdout
    )
    assert state["State"]["Running"]
    assert state["HostConfig"]["NetworkMode"] == "none"
    assert "renewal_failed" not in stack.compose("logs", "--no-log-prefix", "renewer").stdout
