"""Renewal in the Docker mesh, in both modes: the renewer container re-issues 20-second certificates and deploys
them into the identities' volumes while the chain is under load from the host; no request fails."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compose.stack import ROOT, Stack, running_stack
from tests.support import matrix

pytestmark = pytest.mark.compose

SECONDS = 30  # the certificates live 20 s: renewed at least twice in this time, more during start-up


# `make test` renews by thumbprint locally (tests/test_renewal.py) and by SPIFFE ID here, so both modes run under
# load in every CI run; `make test-full` runs both in both places.
@pytest.fixture(scope="module", params=matrix(["thumbprint", "spiffe-id"], ["spiffe-id"]))
def renewing_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"compose-renewal-{request.param}")
    policy = tmp / "policy.toml"
    text = (ROOT / "pki" / "policy.toml").read_text().replace('"90d"', '"20s"')
    policy.write_text(text.replace('"thumbprint"', f'"{request.param}"'))
    with running_stack(tmp, policy) as stack:
        yield stack


def test_certificates_renew_in_the_containers_under_load(renewing_stack: Stack, tmp_path: Path) -> None:
    stack = renewing_stack
    load = subprocess.run(
        [sys.executable, "-m", "client", stack.url("service-a"), "--pki-dir", str(stack.layout.out),
         "--load", "100", "--concurrency", "4", "--during", f"sleep {SECONDS}"],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120,
    )  # fmt: skip
    logs = stack.compose("logs", "--no-log-prefix", "renewer").stdout
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    renewals = Counter(e["identity"] for e in events if e.get("event") == "renewed")
    print(load.stdout.strip().splitlines()[-1], dict(renewals))
    assert load.returncode == 0, load.stdout + load.stderr
    assert " 0 failed" in load.stdout
    assert all(renewals[name] >= 2 for name in ("service-a", "service-b", "service-c", "client")), renewals
