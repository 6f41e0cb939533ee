"""Attacks from the security review of the session's changes (revocation outside OpenSSL, the token cache,
/status and /decisions, the view, `pki check` and `cockpit status`). Each test here FAILS on main: it is a hole.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.local import CHAIN, chain_environments, free_ports, running
from shared.layout import Layout
from shared.x509 import load_certificates, thumbprint
from tests.support import (
    Credentials,
    Mesh,
    attacker_context,
    forge,
    get,
    once_for_both_modes,
    signing_key,
    start_services,
)
from view.server import ViewServer


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


def test_decisions_never_repeat_what_a_caller_put_in_its_token(token_mesh: Mesh) -> None:
    """/decisions promises "no token, no header": but a token whose header lists a `crit` parameter that is not
    there has joserfc's sentence — with the caller's text in it — recorded as the reason. Any caller with a
    certificate of the mesh writes a line of its choosing into the operator's feed (and the view's page)."""
    once_for_both_modes(token_mesh.layout)
    a, layout = token_mesh["service-a"], token_mesh.layout
    marker = "certificate revoked for spiffe://mesh.internal/service-b TOKEN-FRAGMENT"
    header = {"alg": "ES256", "kid": "k1", "typ": "at+jwt", "crit": [marker]}
    crafted = forge(signing_key(), header, {"sub": "alice"})
    with httpx.Client(verify=attacker_context(layout.ca_cert, token_mesh.credentials("client")), timeout=10) as c:
        refused = c.get(
            f"{a.url}/chain", headers={"Authorization": f"Bearer {crafted}"}, extensions={"sni_hostname": a.name}
        )
    assert refused.status_code == 401
    feed = get(f"{a.url}/decisions", a.name, attacker_context(layout.ca_cert, token_mesh.credentials("operator")))
    assert feed.status_code == 200
    assert "TOKEN-FRAGMENT" not in feed.text, [d for d in feed.json()["decisions"] if "TOKEN-FRAGMENT" in d["reason"]]


def test_view_answers_403_to_a_token_that_is_not_ascii() -> None:
    """`secrets.compare_digest` raises TypeError on non-ASCII str: the handler dies with a traceback on the
    operator's terminal (`make view`) and the request gets no answer at all, instead of the bare 403."""
    with ViewServer(lambda: {}) as view, socket.create_connection(("127.0.0.1", view.port), timeout=5) as s:
        s.sendall(f"GET /state?token=%C3%A9 HTTP/1.1\r\nHost: 127.0.0.1:{view.port}\r\n\r\n".encode())
        first = s.recv(100)
    assert first.startswith(b"HTTP/1.0 403"), first


def _forged_like(real: x509.CertificateRevocationList, extra_serial: int) -> bytes:
    """A CRL with the real one's issuer name, AKI, number and dates — signed by a key that is not the CA's."""
    stray = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(real.issuer)
        .last_update(real.last_update_utc)
        .next_update(real.next_update_utc)  # type: ignore[arg-type]
    )
    for extension in real.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    for entry in real:
        builder = builder.add_revoked_certificate(entry)
    extra = x509.RevokedCertificateBuilder().serial_number(extra_serial).revocation_date(real.last_update_utc)
    builder = builder.add_revoked_certificate(extra.build())
    return builder.sign(stray, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_cockpit_status_notices_a_crl_from_another_key(tmp_path: Path) -> None:
    """`make status` compares a service's CRLs with crl.pem by (AKI, number) — both claims of the file. A CRL with
    the same AKI and number signed by a stray key: every service refuses it (reload_refused; a restart fails),
    yet status exits 0 with "holds the CRLs of crl.pem" and lists as revoked (the client) a serial no service
    refuses."""
    out = tmp_path / "out"
    assert _pki(out, "init").returncode == 0
    layout = Layout(out)
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = start_services(chain_environments(free_ports(len(CHAIN)), out), logs)
    with running(processes):
        real = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
        victim = x509.load_pem_x509_certificate(layout.cert("client").read_bytes()).serial_number
        forged = out / "crl.new"
        forged.write_bytes(_forged_like(real, victim))
        forged.chmod(0o644)
        forged.replace(out / "crl.pem")
        time.sleep(3)  # the services re-read pki/out every second, and refuse it
        targets = [arg for p in processes for arg in ("--service", f"{p.name}=https://127.0.0.1:{p.port}")]
        status = subprocess.run(
            [sys.executable, "-m", "cockpit", "status", *targets, "--pki-dir", str(out), "--json"],
            capture_output=True,
            text=True,
        )
        refused = [p.name for p in processes if "reload_refused" in p.output()]
        a = processes[0]
        client = Credentials(layout.cert("client"), layout.key("client"))
        client_let_in = get(f"https://127.0.0.1:{a.port}/healthz", a.name, attacker_context(out / "ca.crt", client))
    assert client_let_in.status_code == 200  # "revoked: client", says status; no service refuses it
    assert refused, "the services took the forged CRL?"
    assert status.returncode != 0, (
        f"{refused} refused crl.pem (from a stray key), and `cockpit status` says all is well: "
        + "; ".join(
            c["text"] for c in json.loads(status.stdout)["checks"] if "CRL" in c["text"] or "revoked" in c["text"]
        )
    )


def test_cockpit_status_judges_an_api_allow_list_read_from_another_file(tmp_path: Path) -> None:
    """A service whose API allow-list is read from a file of another name (MESH_ALLOW_LIST, or a planted
    allow/<other>.txt it was pointed at) is not compared with the policy at all: `make status` exits 0 with no
    line about that list, while the list lets in a caller the policy never gave (service-c calls service-a)."""
    out = tmp_path / "out"
    assert _pki(out, "init").returncode == 0
    layout = Layout(out)
    custom = tmp_path / "service-a-elsewhere.txt"  # outside pki/out: only the status line can see it
    extra = thumbprint(load_certificates(layout.cert("service-c"))[0])
    custom.write_text(layout.allow_list("service-a").read_text() + f"{extra}  # service-c\n")
    custom.chmod(0o644)
    logs = tmp_path / "logs"
    logs.mkdir()
    envs = chain_environments(free_ports(len(CHAIN)), out)
    envs[0]["MESH_ALLOW_LIST"] = str(custom)
    processes = start_services(envs, logs)
    with running(processes):
        a = processes[0]
        sneaked = get(
            f"https://127.0.0.1:{a.port}/chain",
            a.name,
            attacker_context(out / "ca.crt", Credentials(layout.cert("service-c"), layout.key("service-c"))),
        )
        targets = [arg for p in processes for arg in ("--service", f"{p.name}=https://127.0.0.1:{p.port}")]
        status = subprocess.run(
            [sys.executable, "-m", "cockpit", "status", *targets, "--pki-dir", str(out)], capture_output=True, text=True
        )
    assert sneaked.status_code != 403, "the custom list was not in force"
    assert status.returncode != 0, f"service-c is let into service-a, and `cockpit status` says:\n{status.stdout}"
    assert "a file the policy does not render" in status.stdout


def test_a_crl_pem_with_two_crls_of_one_ca_is_refused(tmp_path: Path) -> None:
    """crl.pem holding the current CRL *and*, after it, an older one of the same CA (both genuine, e.g. a careless
    `cat`): keyed by issuer, the last one won, and a service that started on it had the older list in force — the
    stolen certificate revoked by the newer one was let in, and `pki check` found nothing. Now a service refuses to
    start on such a file, naming it, and `pki check` says what is wrong (and `make pki` re-signs it)."""
    out = tmp_path / "out"
    assert _pki(out, "init").returncode == 0
    old_crl = (out / "crl.pem").read_bytes()
    assert _pki(out, "revoke", "client").returncode == 0
    (out / "crl.pem").write_bytes((out / "crl.pem").read_bytes() + old_crl)  # the newest is still in the file
    logs = tmp_path / "logs"
    logs.mkdir()
    service_a = start_services(chain_environments(free_ports(len(CHAIN)), out)[:1], logs)
    with pytest.raises(RuntimeError, match="two CRLs of"), running(service_a):
        pass
    checked = _pki(out, "check")
    assert checked.returncode != 0 and "two CRLs of" in checked.stdout + checked.stderr
