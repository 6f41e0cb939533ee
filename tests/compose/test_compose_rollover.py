"""A root CA rollover in the Docker mesh (`make rotate-ca ROOT=1` as it runs with Docker up: each stage
deployed into the containers by the pki job), under load from the host, in both authorization modes."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.x509 import load_certificates, thumbprint
from tests.compose.stack import ROOT, SERVICES, Stack, running_stack
from tests.support import TLS_REFUSALS, Credentials, attacker_context, get, matrix

pytestmark = pytest.mark.compose


# Both modes run locally (tests/test_renewal.py, tests/test_rollover.py); here one, unless `make test-full`.
@pytest.fixture(scope="module", params=matrix(["thumbprint", "spiffe-id"], ["spiffe-id"]))
def rolling_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"compose-rollover-{request.param}")
    policy = tmp / "policy.toml"
    policy.write_text((ROOT / "pki" / "policy.toml").read_text().replace('"thumbprint"', f'"{request.param}"'))
    with running_stack(tmp, policy) as stack:
        stack.policy_file = policy  # type: ignore[attr-defined]
        yield stack


def test_a_root_rollover_in_the_containers_fails_no_request(rolling_stack: Stack, tmp_path: Path) -> None:
    stack, layout = rolling_stack, rolling_stack.layout
    stale = Credentials(tmp_path / "old.crt", tmp_path / "old.key")
    shutil.copy(layout.cert("client"), stale.cert)
    shutil.copy(layout.key("client"), stale.key)
    deploy = f"docker compose -p {stack.project} run --rm --no-deps -T pki"
    services = [f"--service={name}=https://127.0.0.1:{stack.ports[name]}" for name in SERVICES]
    rotate = [sys.executable, "-m", "pki", "--out", str(layout.out), "--policy", str(stack.policy_file),  # type: ignore[attr-defined]
              "rotate-ca", "--root", *services, "--after-each-stage", deploy]  # fmt: skip
    load = subprocess.run(
        [sys.executable, "-m", "client", stack.url("service-a"), "--pki-dir", str(layout.out),
         "--load", "100", "--concurrency", "4", "--during", shlex.join(rotate)],
        cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(load.stdout.strip().splitlines()[-5:])
    assert load.returncode == 0, load.stdout + load.stderr
    assert " 0 failed" in load.stdout and "rolled over" in load.stdout
    new_anchor = thumbprint(load_certificates(layout.ca_cert)[0])
    client = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
    for name in SERVICES:
        assert get(stack.url(name, "/healthz"), name, client).json()["trust_anchors"] == [new_anchor]
        with pytest.raises(TLS_REFUSALS):
            get(stack.url(name, "/healthz"), name, attacker_context(layout.ca_cert, stale))
