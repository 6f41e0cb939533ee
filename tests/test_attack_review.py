"""Attacks from the security review of the session's changes (revocation outside OpenSSL, the token cache,
/status and /decisions, the view, `pki check` and `cockpit status`). Each test here FAILS on main: it is a hole.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from services.local import CHAIN, chain_environments, free_ports, running
from tests.support import Credentials, attacker_context, get, start_services


def _pki(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pki", "--out", str(out), *args], capture_output=True, text=True)


def test_pki_check_notices_a_crl_put_back_that_unrevokes_a_stolen_key(tmp_path: Path) -> None:
    """An older crl.pem — genuinely signed by our intermediate, not expired — put back after `pki revoke`:
    `pki check` says "all is well" and `pki init` "up to date" (and leaves it), and a service started on those
    files lets the stolen, revoked certificate in. The revocation record (revocations.json) says otherwise."""
    out = tmp_path / "out"
    assert _pki(out, "init").returncode == 0
    old_crl = tmp_path / "old-crl.pem"
    shutil.copy(out / "crl.pem", old_crl)
    stolen = Credentials(tmp_path / "stolen.crt", tmp_path / "stolen.key")
    shutil.copy(out / "client.crt", stolen.cert)
    shutil.copy(out / "client.key", stolen.key)
    revoked = _pki(out, "revoke", "client")
    assert revoked.returncode == 0, revoked.stderr
    shutil.copy(old_crl, out / "crl.pem")  # the attacker's (or a careless restore's) one file

    # The revocation is lost at every service that (re)starts now: proven against a real process.
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = start_services(chain_environments(free_ports(len(CHAIN)), out), logs)
    with running(processes):
        a = processes[0]
        try:
            answer = get(f"https://127.0.0.1:{a.port}/healthz", a.name, attacker_context(out / "ca.crt", stolen))
            let_in = answer.status_code == 200
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            let_in = False
    checked = _pki(out, "check")
    assert not (let_in and checked.returncode == 0), (
        f"the stolen certificate is let in again (HTTP 200 from {a.name}), and `pki check` says: {checked.stdout}"
    )
