"""Rolling the CA over under load, with the same processes: the intermediate, and the root with it, in both
authorization modes. Afterwards the old CA's certificates are refused by every service, at the TLS layer."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pki import Policy, init
from services.local import chain_environments, running
from shared.layout import Layout
from shared.x509 import load_certificates, thumbprint
from tests.compose.stack import ROOT
from tests.support import TLS_REFUSALS, Credentials, attacker_context, free_ports, get, matrix, start_services

pytestmark = pytest.mark.e2e


def policy_file(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text((ROOT / "pki" / "policy.toml").read_text().replace('"thumbprint"', f'"{mode}"'))
    return path


def rotate_ca(layout: Layout, policy: Path, envs: list[dict[str, str]], *extra: str) -> list[str]:
    services = [f"--service={e['MESH_NAME']}=https://127.0.0.1:{e['MESH_PORT']}" for e in envs]
    return [
        sys.executable,
        "-m",
        "pki",
        "--out",
        str(layout.out),
        "--policy",
        str(policy),
        "rotate-ca",
        *services,
        *extra,
    ]


# Each mode and each depth once under `make test`; all four under `make test-full`.
@pytest.mark.parametrize(
    ("mode", "root"),
    matrix(
        [("thumbprint", False), ("thumbprint", True), ("spiffe-id", False), ("spiffe-id", True)],
        [("thumbprint", False), ("spiffe-id", True)],
    ),
    ids=lambda value: {False: "intermediate", True: "root"}.get(value, value),
)
def test_a_rollover_under_load_fails_no_request(tmp_path: Path, mode: str, root: bool) -> None:
    policy = policy_file(tmp_path, mode)
    layout = Layout(tmp_path / "pki")
    init(layout, Policy.load(policy))
    stale = Credentials(tmp_path / "old.crt", tmp_path / "old.key")  # an identity from the CA about to retire
    shutil.copy(layout.cert("client"), stale.cert)
    shutil.copy(layout.key("client"), stale.key)
    old_anchor = thumbprint(load_certificates(layout.ca_cert)[0])
    envs = chain_environments(free_ports(3), layout.out, MESH_RELOAD_INTERVAL="0.25")
    processes = start_services(envs, tmp_path)
    with running(processes):
        pids = [p.process.pid for p in processes]  # type: ignore[union-attr]
        # A keep-alive connection made with the old CA's identity, before the rollover: it must not outlive it.
        held = attacker_context(layout.ca_cert, stale).wrap_socket(
            socket.create_connection(("127.0.0.1", int(envs[0]["MESH_PORT"])), timeout=30), server_hostname="service-a"
        )
        closed, stop = threading.Event(), threading.Event()

        def keep_busy() -> None:  # a request every 0.3 s: never idle long enough for a keep-alive timeout
            try:
                while not stop.is_set():
                    held.sendall(b"GET /healthz HTTP/1.1\r\nHost: service-a\r\n\r\n")
                    if not held.recv(65536):
                        break
                    time.sleep(0.3)
            except OSError:
                pass
            closed.set()

        threading.Thread(target=keep_busy, daemon=True).start()
        command = " ".join(rotate_ca(layout, policy, envs, *(["--root"] if root else [])))
        load = subprocess.run(
            [sys.executable, "-m", "client", f"https://127.0.0.1:{envs[0]['MESH_PORT']}/chain",
             "--pki-dir", str(layout.out), "--load", "200", "--concurrency", "4", "--during", command],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        print(load.stdout.strip())
        assert load.returncode == 0, load.stdout + load.stderr
        assert " 0 failed" in load.stdout and "rolled over" in load.stdout
        assert [p.process.pid for p in processes] == pids  # type: ignore[union-attr]
        new_anchor = thumbprint(load_certificates(layout.ca_cert)[0])
        assert (new_anchor != old_anchor) == root
        assert closed.wait(5), "a connection made under the retired CA is still open"
        stop.set()
        held.close()
        for env in envs:
            url, name = f"https://127.0.0.1:{env['MESH_PORT']}", env["MESH_NAME"]
            client = Credentials(layout.cert("client"), layout.key("client"))
            health = get(f"{url}/healthz", name, attacker_context(layout.ca_cert, client)).json()
            assert health["trust_anchors"] == [new_anchor]
            assert len(health["issuers"]) == 1 and health["issuers"] == [health["certificate"]["issuer"]]
            with pytest.raises(TLS_REFUSALS):  # the old CA's identity, wherever it goes
                get(f"{url}/healthz", name, attacker_context(layout.ca_cert, stale))


def test_a_gate_that_does_not_hold_stops_the_rollover_naming_service_and_stage(tmp_path: Path) -> None:
    policy = policy_file(tmp_path, "thumbprint")
    layout = Layout(tmp_path / "pki")
    init(layout, Policy.load(policy))
    envs = chain_environments(free_ports(3), layout.out, MESH_RELOAD_INTERVAL="0.25")
    processes = start_services(envs, tmp_path)
    with running(processes):
        processes[2].stop()  # service-c is down
        result = subprocess.run(
            [*rotate_ca(layout, policy, envs, "--root", "--gate-timeout", "3")], capture_output=True, text=True
        )
        assert result.returncode == 1
        assert "rollover stopped at stage 'publish': service-c" in result.stderr
        # The mesh works on the stage it reached: A and B trust both roots and answer.
        client = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        for env in envs[:2]:
            health = get(f"https://127.0.0.1:{env['MESH_PORT']}/healthz", env["MESH_NAME"], client).json()
            assert len(health["trust_anchors"]) == 2
        with pytest.raises(httpx.HTTPError):
            get(f"https://127.0.0.1:{envs[2]['MESH_PORT']}/healthz", "service-c", client)
