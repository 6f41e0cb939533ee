"""Every CRL we can sign stays fresh, a stalled CA rollover included; an expiring one is a metric and a warning.

A rollover stopped after its publish or issue stage leaves two intermediates in play and a CRL for each in
crl.pem. Before, the other intermediate's CRL was appended unchanged and never re-signed: once it expired, every
service refused each later crl.pem whole, and a `pki revoke` had no effect. Here CRLs live 10 seconds, the
shortest the policy allows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.handshake import handshake_once
from pki import CertificateAuthority, Policy, init, load_issuer
from pki.revocation import CRL_VALIDITY, crl_needs_renewal, first_crl, revoke_certificate, revoke_serial, write_crl
from pki.rollover import RollOver
from services.local import chain_environments, running
from shared.layout import Layout
from shared.tls import LiveTLS, TLSMaterial, client_context
from shared.x509 import crl_blocks, crl_number
from tests.compose.stack import ROOT
from tests.support import (
    TLS_REFUSALS,
    Credentials,
    Service,
    attacker_context,
    free_ports,
    get,
    matrix,
    start_services,
    wait_until,
)

# Without processes, by SPIFFE ID: a renewal in the issue stage waits for no allow-list to be re-read.
BY_NAME = dataclasses.replace(Policy.load(), authorize_by="spiffe-id")
LIFETIME = "10s"  # the policy's minimum: re-signed with 5 s left; services warn with 2.5 s left


def crls(layout: Layout) -> dict[str, x509.CertificateRevocationList]:
    """issuer → its CRL, as crl.pem has them."""
    found = [x509.load_pem_x509_crl(block) for block in crl_blocks(layout.crl.read_bytes())]
    return {crl.issuer.rfc4514_string(): crl for crl in found}


def stall(layout: Layout, stage: str, policy: Policy) -> None:
    """The state a rollover leaves when the gate after `stage` does not hold."""
    rollover = RollOver(layout, policy, services={})
    rollover.publish()
    if stage == "issue":
        rollover.issue()


# ── without processes ─────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("stage", ["publish", "issue"])
def test_during_a_rollover_every_crl_is_re_signed_by_its_own_ca(tmp_path: Path, stage: str) -> None:
    policy = BY_NAME
    layout = Layout(tmp_path)
    init(layout, policy)
    stall(layout, stage, policy)
    before = crls(layout)
    write_crl(layout, dt.timedelta(seconds=10))
    after = crls(layout)
    assert sorted(after) == sorted(before) and len(after) == 2
    signers = {
        CertificateAuthority.load(cert, key).cert.subject.rfc4514_string(): CertificateAuthority.load(cert, key)
        for cert, key in [
            (layout.intermediate_cert, layout.intermediate_key),
            (layout.rollover / "intermediate.crt", layout.rollover / "intermediate.key"),
        ]
    }
    for issuer, crl in after.items():
        assert crl_number(crl) > crl_number(before[issuer]), issuer
        assert crl.last_update_utc > before[issuer].last_update_utc, issuer
        assert crl.next_update_utc - crl.last_update_utc <= dt.timedelta(seconds=12.5), issuer
        assert crl.is_signature_valid(signers[issuer].cert.public_key()), issuer
    # The rollover's own copy follows, so that the next re-signing (and `retire`) starts from it.
    assert (layout.rollover / "crl.pem").read_bytes() in layout.crl.read_bytes()


def test_mid_rollover_a_revocation_lands_on_the_crl_of_the_ca_that_issued_the_certificate(tmp_path: Path) -> None:
    """Stopped after `issue`: the old intermediate's leaves are still valid (a copy kept somewhere), and only the
    old intermediate's CRL can revoke them — a CRL applies to the leaves of the CA that signed it."""
    policy = BY_NAME
    layout = Layout(tmp_path / "pki")
    init(layout, policy)
    old_copy = tmp_path / "client-old.crt"
    shutil.copy(layout.cert("client"), old_copy)
    stall(layout, "issue", policy)
    old_serial = x509.load_pem_x509_certificate(old_copy.read_bytes()).serial_number
    new_serial = x509.load_pem_x509_certificate(layout.cert("operator").read_bytes()).serial_number
    revoke_certificate(layout, old_copy, "key-compromise", lifetime=CRL_VALIDITY)
    revoke_serial(layout, new_serial, "unspecified", lifetime=CRL_VALIDITY)
    old_ca = CertificateAuthority.load(layout.rollover / "intermediate.crt", layout.rollover / "intermediate.key")
    listed = {issuer: {entry.serial_number for entry in crl} for issuer, crl in crls(layout).items()}
    assert old_serial in listed[old_ca.cert.subject.rfc4514_string()]
    assert new_serial not in listed[old_ca.cert.subject.rfc4514_string()]
    assert new_serial in listed[load_issuer(layout).cert.subject.rfc4514_string()]


def forged_crl(genuine: x509.CertificateRevocationList) -> bytes:
    """A CRL that claims `genuine`'s issuer, name and key id alike, one number later — signed with another key."""
    key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(genuine.issuer)
        .last_update(genuine.last_update_utc)
        .next_update(genuine.next_update_utc or genuine.last_update_utc + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(crl_number(genuine) + 1), critical=False)
        .add_extension(genuine.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value, critical=False)
    )
    for entry in genuine:
        forged = forged.add_revoked_certificate(entry)
    return forged.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_the_crl_of_an_intermediate_a_service_has_no_certificate_of_is_verified_before_its_leaves_get_in(
    tmp_path: Path,
) -> None:
    """A service verifies each CRL once (not OpenSSL, on every handshake). Mid-rollover, the old intermediate's
    CRL cannot be verified at reload — the service's own chain is the new one's — so the first handshake with
    one of its leaves verifies it with the intermediate OpenSSL has just verified up to ca.crt. A forged CRL
    there (the old intermediate's name and key id, another key's signature) lets none of its leaves in."""
    layout = Layout(tmp_path / "pki")
    init(layout, BY_NAME)
    old = Credentials(tmp_path / "client-old.crt", tmp_path / "client-old.key")
    shutil.copy(layout.cert("client"), old.cert)
    shutil.copy(layout.key("client"), old.key)
    stall(layout, "issue", BY_NAME)
    caller = client_context(TLSMaterial(layout.ca_cert, old.cert, old.key))

    def recheck_of_a_handshake() -> str | None:
        live, seen = LiveTLS(layout.material("service-a")), []
        handshake_once(live.server, caller, "service-a", check=lambda _, server: seen.append(live.recheck(server)))
        return seen[0]

    assert recheck_of_a_handshake() is None
    pem = layout.crl.read_bytes()
    old_subject = x509.load_pem_x509_certificate((layout.rollover / "intermediate.crt").read_bytes()).subject
    genuine = next(crl for crl in crls(layout).values() if crl.issuer == old_subject)
    block = next(b for b in crl_blocks(pem) if x509.load_pem_x509_crl(b).issuer == old_subject)
    layout.crl.write_bytes(pem.replace(block, forged_crl(genuine)))
    assert recheck_of_a_handshake() == "CRL signature failure"


def test_an_expiring_crl_of_the_other_intermediate_is_due_for_re_signing(tmp_path: Path) -> None:
    policy = Policy.load()
    layout = Layout(tmp_path)
    init(layout, policy)
    stall(layout, "publish", policy)
    assert not crl_needs_renewal(layout, policy.crl_lifetime)
    # The current intermediate's CRL fresh for 30 days, the new one's with 10 seconds left.
    other = CertificateAuthority.load(layout.rollover / "intermediate.crt", layout.rollover / "intermediate.key")
    current = crl_blocks(layout.crl.read_bytes())[0]
    layout.crl.write_bytes(current + first_crl(other, dt.timedelta(seconds=10)))
    assert crl_needs_renewal(layout, policy.crl_lifetime)


def test_a_crl_signed_for_longer_than_the_policy_says_is_re_signed(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    init(layout, Policy.load())  # 30 days, as `pki revoke` signs
    assert not crl_needs_renewal(layout, dt.timedelta(days=30))
    assert crl_needs_renewal(layout, dt.timedelta(minutes=10))
    write_crl(layout, dt.timedelta(minutes=10))
    assert not crl_needs_renewal(layout, dt.timedelta(minutes=10))


def test_the_crl_lifetime_is_a_policy_setting(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    text = (ROOT / "pki" / "policy.toml").read_text()
    assert Policy.load().crl_lifetime == dt.timedelta(days=30)
    path.write_text(text.replace('crl_lifetime = "30d"', 'crl_lifetime = "2h"'))
    assert Policy.load(path).crl_lifetime == dt.timedelta(hours=2)
    path.write_text(text.replace('crl_lifetime = "30d"', 'crl_lifetime = "5s"'))
    with pytest.raises(Exception, match="crl_lifetime = '5s' is too short"):
        Policy.load(path)


# ── with the services, the renewer and the CLI as real processes ──────────────────────────────────────────────


def refused(url: str, name: str, context: ssl.SSLContext) -> bool:
    try:
        get(url, name, context)
    except TLS_REFUSALS:
        return True
    return False


# The issue stage under `make test` (it also shows the warning and `make pki` as its fix); both under test-full.
@pytest.mark.e2e
@pytest.mark.parametrize("stage", matrix(["publish", "issue"], ["issue"]))
def test_a_stalled_rollover_keeps_revocation_working(tmp_path: Path, stage: str) -> None:
    policy_file = tmp_path / "policy.toml"
    text = (ROOT / "pki" / "policy.toml").read_text().replace('crl_lifetime = "30d"', f'crl_lifetime = "{LIFETIME}"')
    if stage == "issue":  # both modes, one each (the CRLs do not depend on it); by name the renewals wait less
        text = text.replace('authorize_by = "thumbprint"', 'authorize_by = "spiffe-id"')
    policy_file.write_text(text)
    policy = Policy.load(policy_file)
    layout = Layout(tmp_path / "pki")
    init(layout, policy)
    pki = [sys.executable, "-m", "pki", "--out", str(layout.out), "--policy", str(policy_file)]
    envs = chain_environments(free_ports(3), layout.out, MESH_RELOAD_INTERVAL="0.25")
    client = Credentials(layout.cert("client"), layout.key("client"))
    operator = Credentials(layout.cert("operator"), layout.key("operator"))
    with running(start_services(envs, tmp_path)) as processes:
        services = [Service(p) for p in processes]
        a, b = services[0], services[1]
        if stage == "publish":  # the real command, stopped by a gate that cannot hold (a service that is down)
            ghost = f"--service=ghost=https://127.0.0.1:{free_ports(1)[0]}"
            result = subprocess.run([*pki, "rotate-ca", ghost, "--gate-timeout", "1"], capture_output=True, text=True)
            assert "rollover stopped at stage 'publish': ghost" in result.stderr, result.stderr
        else:
            stall(layout, stage, policy)
        stalled, at_stall = dt.datetime.now(dt.UTC), {s.name: s.mark() for s in services}
        first = {issuer: crl_number(crl) for issuer, crl in crls(layout).items()}
        assert len(first) == 2
        renewer_log = tmp_path / "renewer.log"
        with renewer_log.open("wb") as output:
            renewer = subprocess.Popen(
                [*pki, "renew", "--watch", "--interval", "0.25"], stdout=output, stderr=subprocess.STDOUT
            )
            try:
                # Past the lifetime of every CRL there was at the stall, each issuer's re-signed twice or more.
                wait_until(
                    lambda: (
                        dt.datetime.now(dt.UTC) > stalled + policy.crl_lifetime + dt.timedelta(seconds=2)
                        and all(crl_number(crl) >= first[issuer] + 2 for issuer, crl in crls(layout).items())
                    ),
                    timeout=60,
                    describe=lambda: (
                        f"CRL numbers {[crl_number(c) for c in crls(layout).values()]}, at the stall "
                        f"{list(first.values())}; renewer: {renewer_log.read_text()[-2000:]}"
                    ),
                )
                assert sorted(crls(layout)) == sorted(first)
                for service in services:
                    assert not service.events_since(at_stall[service.name], "reload_refused"), service.name
                    assert not service.events_since(at_stall[service.name], "crl_expiring"), service.name
                    health = get(f"{service.url}/healthz", service.name, attacker_context(layout.ca_cert, client))
                    assert sorted(health.json()["issuers"]) == sorted(first)
                metrics = get(f"{a.url}/metrics", a.name, attacker_context(layout.ca_cert, operator)).text
                left = dict(
                    re.findall(r'mesh_crl_next_update_seconds\{service="service-a",issuer="([^"]+)"\} (\S+)', metrics)
                )
                assert sorted(left) == sorted(first) and all(0 < float(s) <= 10 for s in left.values()), metrics

                # A revocation now takes effect at the running services: the client's key, stolen (a copy of its
                # files) before `pki revoke` revokes its certificates and gives it a fresh one, is refused.
                stolen = Credentials(tmp_path / "stolen.crt", tmp_path / "stolen.key")
                shutil.copy(layout.cert("client"), stolen.cert)
                shutil.copy(layout.key("client"), stolen.key)
                marks = {s.name: s.mark() for s in services}
                revoked = subprocess.run([*pki, "revoke", "client"], capture_output=True, text=True)
                assert revoked.returncode == 0, revoked.stderr
                took = wait_until(
                    lambda: (
                        refused(f"{a.url}/chain", a.name, attacker_context(layout.ca_cert, stolen))
                        and any("certificate revoked" in str(e) for e in a.events_since(marks[a.name], "tls_refused"))
                    ),
                    describe=lambda: str(a.events_since(marks[a.name])),
                )
                # Refused by the service's own revoked set once the handshake completed (OpenSSL no longer reads
                # the CRL: its cost grew with every entry), before a byte of the request was read; counted as before.
                refusal = next(e for e in a.events_since(marks[a.name], "tls_refused") if "revoked" in e["reason"])
                assert (
                    refusal["reason"] == "certificate revoked" and refusal["error"] == "refused by the trust in force"
                )
                metrics = get(f"{a.url}/metrics", a.name, attacker_context(layout.ca_cert, operator)).text
                assert re.search(r'mesh_tls_refusals_total\{[^}]*reason="certificate revoked"[^}]*\} [1-9]', metrics)
                print(f"the revocation took effect at service-a within {took:.2f} s")
                b_mark = b.mark()
                assert refused(f"{a.url}/chain", a.name, attacker_context(layout.ca_cert, stolen))
                assert not b.events_since(b_mark, "authz")  # refused at A's handshake: nothing reaches B
                assert not any(s.events_since(marks[s.name], "reload_refused") for s in services)
            finally:
                renewer.terminate()
                renewer.wait(timeout=10)
        assert "renewal_failed" not in renewer_log.read_text()
        if stage == "publish":
            return
        # Without the renewer, a service warns with a quarter of the lifetime left, naming the fix that works: about
        # a CRL the renewer left in force (it says so once per CRL, so on a slow machine possibly before terminate).
        mark = a.mark()
        in_force = {f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}" for crl in crls(layout).values()}

        def warnings() -> list[dict[str, Any]]:
            return [e for e in a.events_since(at_stall[a.name], "crl_expiring") if e["next_update"] in in_force]

        wait_until(lambda: bool(warnings()), timeout=30, describe=lambda: str(a.events_since(at_stall[a.name])[-5:]))
        warning = warnings()[0]
        assert warning["level"] == "warning" and warning["issuer"] in first
        assert "renew --watch" in warning["fix"] and "make pki" in warning["fix"]
        assert subprocess.run([*pki, "init"], capture_output=True).returncode == 0  # what `make pki` runs
        fresh = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
        assert all(crl.next_update_utc > fresh for crl in crls(layout).values())
        wait_until(lambda: any("crl.pem" in str(e.get("files")) for e in a.events_since(mark, "reloaded")))
        assert not a.events_since(mark, "reload_refused")


def test_a_large_crl_is_reloaded_without_stalling_the_event_loop(tmp_path: Path) -> None:
    """A service reloading a CRL of 30,000 entries keeps serving: reading and checking it run in a child process
    (services.offload: a file this large), and only the contexts and the swap run on the loop. Before, the whole
    reload ran on the loop, then on a worker thread that still held the interpreter lock for ~100 ms at a time."""
    from bench.scaling import crl_with
    from services.reloader import Reloader

    layout = Layout(tmp_path / "pki")
    init(layout)
    live = LiveTLS(layout.material("service-a"))
    crl_with(layout, 30_000, layout.crl)
    reloader = Reloader(live, {})

    async def scenario() -> tuple[float, float]:
        gaps, done = [0.0], asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.002)
                gaps.append(time.perf_counter() - last)
                last = time.perf_counter()

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)  # the ticker runs before the reload begins
        start = time.perf_counter()
        await reloader({layout.crl})
        took = time.perf_counter() - start
        done.set()
        await ticking
        return took, max(gaps)

    generation = live.generation
    try:
        took, longest_stall = asyncio.run(scenario())
        assert reloader.offload._child is not None, "read in this process"
    finally:
        reloader.close()
    taken = sum(map(len, live.trust.revoked.values()))
    assert live.generation == generation + 1 and taken >= 30_000  # it was taken, whole
    assert longest_stall < took / 3, f"the loop stalled {longest_stall * 1000:.0f} ms of a {took * 1000:.0f} ms reload"
