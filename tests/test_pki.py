"""The CA: what it issues, where it writes it, and that the chain really verifies."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import stat
import subprocess
import sys
import time
import types

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store

from pki import (
    ROTATION_GRACE,
    PKIError,
    Policy,
    init,
    issue_identity,
    retire,
    revoke,
    rotate_begin,
    rotate_finish,
    rotation,
)
from pki.__main__ import main
from pki.authority import now
from shared.authz import AllowList
from shared.layout import Layout
from shared.x509 import (
    extended_key_usages,
    load_certificates,
    load_crl,
    normalise_thumbprint,
    subject_alt_names,
    thumbprint,
)
from tests.compose.stack import ROOT

POLICY = Policy.load()


def test_layout_is_complete_and_keys_are_private(layout: Layout) -> None:
    assert layout.ca_cert.exists()
    for name in [*POLICY.services, *POLICY.clients]:
        assert layout.cert(name).exists()
        assert stat.S_IMODE(layout.key(name).stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.intermediate_key.stat().st_mode) == 0o600
    for service in POLICY.services:
        assert layout.allow_list(service).exists()


@pytest.mark.parametrize("service", ["service-a", "service-b", "service-c"])
def test_service_certificate(layout: Layout, service: str) -> None:
    leaf, intermediate = load_certificates(layout.cert(service))
    assert leaf.issuer == intermediate.subject
    assert extended_key_usages(leaf) == ["serverAuth", "clientAuth"]
    assert subject_alt_names(leaf) == [
        ("DNS", service),
        ("DNS", "localhost"),
        ("IP", "127.0.0.1"),
        ("URI", f"spiffe://mesh.internal/{service}"),
    ]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_before_utc < leaf.not_valid_after_utc
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 91


def test_client_certificate_is_for_clients_only(layout: Layout) -> None:
    leaf = load_certificates(layout.cert("client"))[0]
    assert extended_key_usages(leaf) == ["clientAuth"]
    assert subject_alt_names(leaf) == [("URI", "spiffe://mesh.internal/client")]


@pytest.mark.parametrize("service", ["service-a", "service-b", "service-c"])
def test_chain_verifies_to_the_root_as_server_and_client(layout: Layout, service: str) -> None:
    leaf, *intermediates = load_certificates(layout.cert(service))
    store = Store(load_certificates(layout.ca_cert))
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(service))
    chain = verifier.verify(leaf, intermediates)
    assert chain[-1] == load_certificates(layout.ca_cert)[0]
    PolicyBuilder().store(store).build_client_verifier().verify(leaf, intermediates)


def test_client_chain_does_not_verify_as_a_server(layout: Layout) -> None:
    leaf, *intermediates = load_certificates(layout.cert("client"))
    store = Store(load_certificates(layout.ca_cert))
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("client"))
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(leaf, intermediates)


def test_thumbprint_is_sha256_of_der(layout: Layout) -> None:
    leaf = load_certificates(layout.cert("service-a"))[0]
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert thumbprint(leaf) == hashlib.sha256(der).hexdigest()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_thumbprint_matches_openssl(layout: Layout) -> None:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(layout.cert("client"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert normalise_thumbprint(out.split("=", 1)[1]) == thumbprint(load_certificates(layout.cert("client"))[0])


def test_normalise_thumbprint_accepts_colons_and_upper_case() -> None:
    hexits = "ab" * 32
    assert normalise_thumbprint(":".join(["AB"] * 32)) == hexits
    assert normalise_thumbprint(f"  {hexits.upper()}\n") == hexits
    for bad in ["ab" * 31, "zz" * 32, "", "ab" * 33]:
        with pytest.raises(ValueError, match="not a SHA-256 thumbprint"):
            normalise_thumbprint(bad)


def test_allow_lists_follow_the_policy(layout: Layout) -> None:
    """Each service's allow-list names exactly its callers: by thumbprint, or by SPIFFE ID."""
    for callee, callers in POLICY.allow.items():
        allow = AllowList.load(layout.allow_list(callee))
        for name in [*POLICY.services, *POLICY.clients]:
            listed = thumbprint(load_certificates(layout.cert(name))[0]) in allow.entries or any(
                str(spiffe_id) == POLICY.spiffe_id(name) for spiffe_id in allow.ids
            )
            assert listed == (name in callers), f"{name} on {callee}'s allow-list?"


def test_init_is_idempotent_and_force_regenerates(tmp_path) -> None:
    layout = Layout(tmp_path)
    assert init(layout) == [
        "ca",
        "intermediate",
        "service-a",
        "service-b",
        "service-c",
        "token-service",
        "client",
        "operator",
        "crl",
    ]
    before = layout.cert("service-a").read_bytes()
    allow_before = layout.allow_list("service-b").read_text()
    assert init(layout) == []
    assert layout.cert("service-a").read_bytes() == before
    assert layout.allow_list("service-b").read_text() == allow_before
    assert "ca" in init(layout, force=True)
    assert layout.cert("service-a").read_bytes() != before


def test_init_keeps_every_leaf_until_it_expires_whatever_its_lifetime(tmp_path, monkeypatch) -> None:
    """`make pki` keeps what exists: a leaf due for renewal is the renewer's, which renews it with an overlap.
    A fixed margin of 7 days re-issued every short-lived identity on every run, in place — and a re-issue in
    place refuses, for a moment, every caller that pins the old thumbprint (found by attack)."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        (ROOT / "pki" / "policy.toml").read_text().replace('leaf_lifetime = "90d"', 'leaf_lifetime = "1h"')
    )
    policy, layout = Policy.load(policy_file), Layout(tmp_path / "out")
    init(layout, policy)
    assert init(layout, policy) == []
    start = now()
    monkeypatch.setattr("pki.identities.now", lambda: start + dt.timedelta(minutes=40))  # due at 32.5 min
    assert init(layout, policy) == []
    monkeypatch.setattr("pki.identities.now", lambda: start + dt.timedelta(minutes=61))  # expired
    assert init(layout, policy) == [*policy.services, *policy.clients]


def test_rsa_option(tmp_path) -> None:
    layout = Layout(tmp_path)
    init(layout, key_type="rsa")
    assert load_certificates(layout.cert("service-a"))[0].public_key().key_size == 2048


def test_issued_identity_is_on_no_allow_list(tmp_path) -> None:
    layout = Layout(tmp_path)
    init(layout)
    identity = issue_identity(layout, POLICY, "billing", extra_sans=["DNS:billing.internal"], client_only=True)
    assert layout.cert("billing").exists()
    assert stat.S_IMODE(layout.key("billing").stat().st_mode) == 0o600
    assert ("DNS", "billing.internal") in subject_alt_names(identity.cert)
    assert extended_key_usages(identity.cert) == ["clientAuth"]
    for service in POLICY.services:
        assert identity.sha256 not in layout.allow_list(service).read_text()


@pytest.mark.parametrize("name", ["ca", "intermediate", "../evil", ""])
def test_reserved_or_odd_names_are_refused(tmp_path, name: str) -> None:
    layout = Layout(tmp_path)
    init(layout)
    with pytest.raises(PKIError):
        issue_identity(layout, POLICY, name)


def test_policy_naming_an_unknown_identity_is_an_error(tmp_path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('trust_domain = "t"\nservices = ["a"]\n[allow]\na = ["ghost"]\n')
    with pytest.raises(PKIError, match="ghost"):
        Policy.load(policy)


def test_cli_inspect_and_fingerprint(layout: Layout) -> None:
    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "pki", "--out", str(layout.out), *args], capture_output=True, text=True, check=True
        ).stdout

    sha = thumbprint(load_certificates(layout.cert("service-b"))[0])
    assert cli("fingerprint", str(layout.cert("service-b"))).strip() == sha
    report = cli("inspect", str(layout.cert("service-b")))
    for expected in [f"sha256   {sha}", "EKU      serverAuth, clientAuth", "URI:spiffe://mesh.internal/service-b"]:
        assert expected in report


def test_each_crl_is_strictly_newer_than_the_one_before(tmp_path) -> None:
    """Services keep every CRL they loaded and OpenSSL picks the newest: a tie would keep the old one."""
    layout = Layout(tmp_path)
    init(layout)
    updates = [load_crl(layout.crl).last_update_utc]
    for name in ("client", "service-a", "service-b"):
        revoke(layout, name, "key-compromise")
        updates.append(load_crl(layout.crl).last_update_utc)
    assert updates == sorted(set(updates)), "lastUpdate must strictly increase"
    crl = load_crl(layout.crl)
    assert len(list(crl)) == 3
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4


def test_make_pki_says_when_an_identity_in_use_is_revoked(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert main(["--out", str(out), "init"]) == 0
    revoke(Layout(out), "service-b", "key-compromise")
    capsys.readouterr()
    assert main(["--out", str(out), "init"]) == 1, "a revoked identity in use: not up to date"
    said = capsys.readouterr()
    assert "service-b's certificate is revoked" in said.err and "make rotate NAME=service-b" in said.err
    assert "up to date" not in said.out


@pytest.mark.fast
@pytest.mark.parametrize("which", [["client"], ["--serial", "SERIAL"], ["--cert", "CERT"]], ids=lambda w: w[0])
def test_a_revocation_signs_its_crl_for_the_policys_lifetime(tmp_path, which: list[str]) -> None:
    """`pki revoke` once signed for 30 days whatever the policy said: a mesh set to short-lived CRLs got a long one
    from every revocation (found by a test that waited for the services' "CRL expiring" warning)."""
    policy = tmp_path / "policy.toml"
    policy.write_text((ROOT / "pki" / "policy.toml").read_text().replace('crl_lifetime = "30d"', 'crl_lifetime = "1h"'))
    out = tmp_path / "pki"
    pki = ["--out", str(out), "--policy", str(policy)]
    assert main([*pki, "init"]) == 0
    copy = shutil.copy(Layout(out).cert("client"), tmp_path / "copy.crt")
    serial = f"{load_certificates(copy)[0].serial_number:x}"
    assert main([*pki, "revoke", *[{"SERIAL": serial, "CERT": str(copy)}.get(w, w) for w in which]]) == 0
    crl = load_crl(Layout(out).crl)
    assert len(list(crl)) == 1
    assert crl.next_update_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)


def test_retire_waits_until_every_service_can_have_switched(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retiring right after a rotation would revoke a certificate a service may still present: it waits out the
    rest of ROTATION_GRACE (the wait recorded, not slept), then unlists and revokes the old certificate only."""
    layout = Layout(tmp_path)
    init(layout, POLICY)
    old = load_certificates(layout.cert("service-b"))[0]
    rotate_begin(layout, POLICY, "service-b")
    rotate_finish(layout, POLICY, "service-b")
    new = load_certificates(layout.cert("service-b"))[0]
    assert thumbprint(old) in AllowList.load(layout.allow_list("service-c"))  # the overlap: both listed
    waits: list[float] = []
    monkeypatch.setattr(rotation, "time", types.SimpleNamespace(time=time.time, sleep=waits.append))
    assert retire(layout, POLICY, "service-b") == old.serial_number
    [wait] = waits
    assert ROTATION_GRACE.total_seconds() - 1 < wait <= ROTATION_GRACE.total_seconds()
    listed = AllowList.load(layout.allow_list("service-c"))
    assert thumbprint(old) not in listed and thumbprint(new) in listed
    assert [entry.serial_number for entry in load_crl(layout.crl)] == [old.serial_number]
    assert not layout.previous_cert("service-b").exists()
    assert retire(layout, POLICY, "service-b") is None  # nothing left to retire


def test_retire_after_the_grace_does_not_wait(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(tmp_path)
    init(layout, POLICY)
    rotate_begin(layout, POLICY, "service-b")
    rotate_finish(layout, POLICY, "service-b")
    waits: list[float] = []
    later = time.time() + ROTATION_GRACE.total_seconds()
    monkeypatch.setattr(rotation, "time", types.SimpleNamespace(time=lambda: later, sleep=waits.append))
    assert retire(layout, POLICY, "service-b") is not None
    assert waits == []
