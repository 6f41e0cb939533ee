"""Certificates that renew themselves under a steady load, in both authorization modes: no request fails.

The short version runs in `make test` (16-second certificates, 30 seconds of load), by thumbprint only: there
a renewal must list the successor, wait, switch and unlist, while by SPIFFE ID it is a rotation by name, which
tests/test_spiffe_mesh.py runs under load. `make test-full` runs both modes; `make renew-soak` runs both for
5 minutes with 2-minute certificates (MESH_RENEWAL_SECONDS, MESH_RENEWAL_LIFETIME).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pki import Policy, init
from services.local import chain_environments, running
from shared.layout import Layout
from shared.x509 import load_certificates
from tests.compose.stack import ROOT
from tests.support import free_ports, matrix, start_services

pytestmark = pytest.mark.e2e

SECONDS = int(os.environ.get("MESH_RENEWAL_SECONDS", "30"))
LIFETIME = os.environ.get("MESH_RENEWAL_LIFETIME", "16s")


@pytest.mark.parametrize("mode", matrix(["thumbprint", "spiffe-id"], ["thumbprint"]))
def test_every_identity_renews_at_least_twice_and_no_request_fails(tmp_path: Path, mode: str) -> None:
    policy_file = tmp_path / "policy.toml"
    text = (ROOT / "pki" / "policy.toml").read_text()
    text = text.replace('authorize_by = "thumbprint"', f'authorize_by = "{mode}"')
    policy_file.write_text(text.replace('leaf_lifetime = "90d"', f'leaf_lifetime = "{LIFETIME}"'))
    policy = Policy.load(policy_file)
    layout = Layout(tmp_path / "pki")
    init(layout, policy)
    first = {name: load_certificates(layout.cert(name))[0].serial_number for name in [*policy.services, "client"]}
    envs = chain_environments(free_ports(3), layout.out, MESH_RELOAD_INTERVAL="0.25")
    renewer_log = tmp_path / "renewer.log"
    with running(start_services(envs, tmp_path)), renewer_log.open("wb") as output:
        renewer = subprocess.Popen(
            [sys.executable, "-m", "pki", "--out", str(layout.out), "--policy", str(policy_file), "renew",
             "--watch", "--interval", "0.25"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            load = subprocess.run(
                [sys.executable, "-m", "client", f"https://127.0.0.1:{envs[0]['MESH_PORT']}/chain",
                 "--pki-dir", str(layout.out), "--load", "100", "--concurrency", "4", "--during", f"sleep {SECONDS}"],
                capture_output=True, text=True, timeout=SECONDS + 120,
            )  # fmt: skip
        finally:
            renewer.terminate()
            renewer.wait(timeout=10)
    events = [json.loads(line) for line in renewer_log.read_text().splitlines() if line.startswith("{")]
    renewals = Counter(e["identity"] for e in events if e.get("event") == "renewed")
    print(load.stdout.strip().splitlines()[-1], dict(renewals))  # shown with -s: the numbers for the record
    assert load.returncode == 0, load.stdout + load.stderr
    assert " 0 failed" in load.stdout
    assert all(renewals[name] >= 2 for name in first), renewals
    assert not [e for e in events if e.get("event") == "renewal_failed"]
    for name, serial in first.items():
        assert load_certificates(layout.cert(name))[0].serial_number != serial
