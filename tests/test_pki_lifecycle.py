"""The PKI's lifecycle edges: revoking after a renewal, commands that would destroy, and writers that race.

- A stolen key, then a renewal, then `pki revoke NAME`: the stolen certificate must be the one refused (issue
  20, item 3). The ledger (pki/out/issued.json) is what makes that possible.
- Half a CA, a lost revocation record, `pki issue` of a live identity: refused, naming the files (item 6).
- One lock (pki.lock): `pki` commands and the renewer take turns writing pki/out.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pki import PKIError, Policy, init, rotate_begin, rotate_finish
from pki import renewal as renewal_module
from pki import rollover as rollover_module
from pki.__main__ import main
from pki.authority import load_issuer
from pki.ledger import entries
from pki.lock import HAND_OFF, pki_lock
from pki.renewal import ABANDONED, Renewer, due
from pki.revocation import revoked
from pki.rollover import RollOver
from services.local import chain_environments, running
from shared.authz import AllowList
from shared.layout import Layout
from shared.x509 import authority_key_id, crl_blocks, load_certificates, load_key, thumbprint
from tests.compose.stack import ROOT
from tests.support import TLS_REFUSALS, Credentials, Mesh, Service, attacker_context, get, start_services, wait_until
from tests.support import free_ports as ports

POLICY_TEXT = (ROOT / "pki" / "policy.toml").read_text()


def policy_file(directory: Path, mode: str = "thumbprint", lifetime: str = "90d") -> Path:
    path = directory / "policy.toml"
    text = POLICY_TEXT.replace('authorize_by = "thumbprint"', f'authorize_by = "{mode}"')
    path.write_text(text.replace('leaf_lifetime = "90d"', f'leaf_lifetime = "{lifetime}"'))
    return path


def pki(layout: Layout, policy: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m pki` as the operator runs it: its own process."""
    command = [sys.executable, "-m", "pki", "--out", str(layout.out), "--policy", str(policy), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=check)


# ── item 3: revoking after a renewal revokes the stolen certificate too ──────────────────────────────────────


@pytest.fixture(params=["thumbprint", "spiffe-id"])
def small_mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Mesh, Path]]:
    """A → B → C of its own (this test revokes the client) on a PKI in the given authorization mode."""
    policy = policy_file(tmp_path, request.param)
    layout = Layout(tmp_path / "pki")
    init(layout, Policy.load(policy))
    envs = chain_environments(ports(3), layout.out, MESH_RELOAD_INTERVAL="0.25")
    processes = start_services(envs, tmp_path)
    with running(processes):
        yield Mesh([Service(p) for p in processes], layout), policy


@pytest.mark.e2e
def test_revoking_after_a_renewal_refuses_the_stolen_certificate(small_mesh: tuple[Mesh, Path], tmp_path: Path) -> None:
    mesh, policy_path = small_mesh
    layout, policy = mesh.layout, Policy.load(policy_path)
    chain = f"{mesh['service-a'].url}/chain"
    stolen = Credentials(tmp_path / "stolen.crt", tmp_path / "stolen.key")
    shutil.copy(layout.cert("client"), stolen.cert)  # the attacker copies the client's files
    shutil.copy(layout.key("client"), stolen.key)
    assert get(chain, "service-a", attacker_context(layout.ca_cert, stolen)).status_code == 200

    # The renewer renews the client (the renewer's own code path), and once every caller has switched it
    # deletes previous/: from then on, nothing in pki/out is the stolen certificate.
    renewer = Renewer(layout, policy)
    renewer.renew(["client"])
    wait_until(lambda: not renewer.tick() and not layout.previous_cert("client").exists())
    # By SPIFFE ID the stolen certificate still calls the chain; by thumbprint it is merely unlisted.
    expected = 200 if policy.authorize_by == "spiffe-id" else 403
    wait_until(lambda: get(chain, "service-a", attacker_context(layout.ca_cert, stolen)).status_code == expected)

    result = pki(layout, policy_path, "revoke", "client", "--reason", "key-compromise")
    assert "fresh key and certificate in place" in result.stdout and "next:" in result.stdout
    assert "`make status` shows which services hold the new CRL" in result.stdout

    def stolen_refused() -> bool:
        try:
            get(chain, "service-a", attacker_context(layout.ca_cert, stolen))
        except TLS_REFUSALS:
            return True
        return False

    wait_until(stolen_refused, timeout=10)

    # The poll that saw the refusal may have had its request admitted by A just before the revocation landed: its
    # connection is cut, but that request still travels down the chain. Before the marks, every request A
    # admitted has reached service-c (or the marks would count its footsteps as the next request's).
    def settled() -> bool:
        admitted = {e["trace_id"] for e in mesh["service-a"].events_since(0, "authz") if e["decision"] == "allow"}
        return admitted <= {e["trace_id"] for e in mesh["service-c"].events_since(0, "authz")}

    wait_until(settled, timeout=10)
    marks = mesh.marks()
    with pytest.raises(TLS_REFUSALS):
        get(chain, "service-a", attacker_context(layout.ca_cert, stolen))
    assert mesh.events_since(marks) == {name: [] for name in mesh.services}, "a service authorized the request"
    # The client's fresh certificate works, at once by SPIFFE ID, by thumbprint once A re-read its allow-list.
    fresh = attacker_context(layout.ca_cert, mesh.credentials("client"))
    wait_until(lambda: get(chain, "service-a", fresh).status_code == 200, timeout=10)


def test_revoke_one_certificate_by_serial_or_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_path = policy_file(tmp_path)
    layout, policy = Layout(tmp_path / "pki"), Policy.load(policy_path)
    init(layout, policy)
    first = load_certificates(layout.cert("client"))[0]
    rotate_begin(layout, policy, "client")
    rotate_finish(layout, policy, "client")  # the first is now in previous/, still listed
    second = load_certificates(layout.cert("client"))[0]
    cli = ["--out", str(layout.out), "--policy", str(policy_path), "revoke"]

    assert main([*cli, "--cert", str(layout.previous_cert("client"))]) == 0
    assert set(revoked(layout)) == {f"{first.serial_number:x}"}  # that one only
    assert not layout.previous_cert("client").exists()
    assert thumbprint(first) not in AllowList.load(layout.allow_list("service-a")).entries, "a revoked pin stays"
    assert load_certificates(layout.cert("client"))[0] == second

    assert main([*cli, "--serial", f"{second.serial_number:x}"]) == 0  # the one in use: replaced at once
    assert set(revoked(layout)) == {f"{first.serial_number:x}", f"{second.serial_number:x}"}
    third = load_certificates(layout.cert("client"))[0]
    assert third != second and thumbprint(third) in AllowList.load(layout.allow_list("service-a")).entries

    capsys.readouterr()
    assert main([*cli, "--serial", "abc123"]) == 1
    assert "not in the ledger" in capsys.readouterr().err
    assert main([*cli, "--cert", str(layout.ca_cert)]) == 1  # not one we issued: our CRL cannot revoke it
    assert "not a certificate this CA issued" in capsys.readouterr().err


def test_list_shows_every_certificate_of_every_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_path = policy_file(tmp_path)
    layout, policy = Layout(tmp_path / "pki"), Policy.load(policy_path)
    init(layout, policy)
    copy = shutil.copy(layout.cert("client"), tmp_path / "copy.crt")
    Renewer(layout, policy, wait=lambda _: None).renew(["client"])
    cli = ["--out", str(layout.out), "--policy", str(policy_path)]
    assert main([*cli, "revoke", "client"]) == 0
    capsys.readouterr()
    assert main([*cli, "list", "--json"]) == 0
    client = json.loads(capsys.readouterr().out)["client"]
    assert [bool(c["revoked"]) for c in client] == [True, True, False]
    assert client[-1]["where"] == "in place" and client[-1]["allow_lists"] == ["service-a", "token-service"]
    assert all(c["allow_lists"] == [] for c in client[:2])
    assert {c["serial"] for c in client} == {e.serial for e in entries(layout) if e.name == "client"}
    assert main([*cli, "inspect", str(layout.cert("client")), str(copy)]) == 0
    shown = capsys.readouterr().out
    assert "revoked  no" in shown and "revoked  YES" in shown


# ── item 6: commands that would destroy ─────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("lost", ["ca.crt", "ca.key", "intermediate.crt", "intermediate.key"])
def test_half_a_ca_is_refused_and_nothing_is_replaced(
    tmp_path: Path, lost: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The services' error for a missing ca.crt says `make pki`: that must stop, not make a new CA quietly."""
    out = tmp_path / "pki"
    assert main(["--out", str(out), "init"]) == 0
    assert main(["--out", str(out), "revoke", "service-b"]) == 0
    (out / lost).unlink()
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert main(["--out", str(out), "init"]) == 1  # what `make pki` runs
    error = capsys.readouterr().err
    assert f"{lost} missing" in error and "--force" in error
    assert all(name in error for name in {"ca.crt", "ca.key", "intermediate.crt", "intermediate.key"} - {lost})
    after = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert after == before, "something was written"


def test_revocations_without_a_ca_are_refused_and_force_says_what_it_drops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pki"
    assert main(["--out", str(out), "init"]) == 0
    assert main(["--out", str(out), "revoke", "client"]) == 0
    for name in ("ca.crt", "ca.key", "intermediate.crt", "intermediate.key"):
        (out / name).unlink()
    capsys.readouterr()
    assert main(["--out", str(out), "init"]) == 1
    assert "revocations.json and issued.json" in capsys.readouterr().err
    assert (out / "revocations.json").exists()
    assert main(["--out", str(out), "init", "--force"]) == 0
    said = capsys.readouterr().out
    assert "throwing away" in said and "revocations.json (1 revocations" in said and "issued.json" in said
    assert json.loads((out / "revocations.json").read_text())["revoked"] == []


def test_issue_refuses_an_existing_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert main(["--out", str(out), "init"]) == 0
    key = (out / "service-a.key").read_bytes()
    capsys.readouterr()
    assert main(["--out", str(out), "issue", "service-a"]) == 1
    assert "make rotate NAME=service-a" in capsys.readouterr().err
    assert (out / "service-a.key").read_bytes() == key


# ── the lock ────────────────────────────────────────────────────────────────────────────────────────────────


def test_commands_and_the_renewer_wait_for_the_lock(tmp_path: Path) -> None:
    """While someone holds pki/out's lock, `pki revoke` and a renewer tick wait, saying who holds it."""
    policy_path = policy_file(tmp_path)
    layout = Layout(tmp_path / "pki")
    init(layout, Policy.load(policy_path))
    base = [sys.executable, "-m", "pki", "--out", str(layout.out), "--policy", str(policy_path)]
    with pki_lock(layout, "the test, holding it"):
        # Processes of their own, not acting for us: without the hand-off token our lock would let them in.
        env = {k: v for k, v in os.environ.items() if k != HAND_OFF}
        waiting = [
            subprocess.Popen([*base, *command], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for command in (["revoke", "client"], ["renew"])
        ]
        for process in waiting:
            assert process.stderr is not None
            line = process.stderr.readline()  # blocks until the process has said it waits
            assert "is being written by pid" in line and "the test, holding it" in line
        time.sleep(0.5)  # the one fixed wait here: to show that nothing happens during it
        assert all(process.poll() is None for process in waiting)
        assert not layout.revocations.exists() or revoked(layout) == {}
    for process in waiting:
        assert process.wait(timeout=60) == 0, process.communicate()
    assert revoked(layout)


def test_the_renewer_and_commands_hammering_at_once_leave_a_consistent_pki(tmp_path: Path) -> None:
    """A renewer renewing every few seconds, and `pki revoke` and a CA rollover run meanwhile:
    without the lock, one of them finds its successor gone — "no rotation of service-b is under way", as the
    walkthrough's CA rollover once failed with `make rotate-ca` and the renewer — or a record loses a write."""
    policy_path = policy_file(tmp_path, lifetime="6s")
    layout, policy = Layout(tmp_path / "pki"), Policy.load(policy_path)
    init(layout, policy)
    log = tmp_path / "renewer.log"
    with log.open("wb") as output:
        renewer = subprocess.Popen(
            [sys.executable, "-m", "pki", "--out", str(layout.out), "--policy", str(policy_path), "renew",
             "--watch", "--interval", "0.1"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            # Start while the renewer is in the middle of renewing (it holds the lock for its grace period).
            def renewing() -> bool:
                return layout.next_cert("client").exists() and "the renewer" in layout.lock.read_text()

            wait_until(renewing, timeout=30)
            results = [pki(layout, policy_path, "revoke", "client", check=False)]
            # `make rotate-ca`'s code, every stage; with no service named, its gates have nobody to wait for.
            RollOver(layout, policy, services={}, log=lambda _: None).run()
        finally:
            renewer.terminate()
            renewer.wait(timeout=30)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert not [e for e in events if e.get("event") == "renewal_failed"], events
    assert_consistent(layout, policy)


def test_two_ca_rollovers_at_once_take_turns_and_leave_the_new_intermediate_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `rotate-ca` runs at once (found by attack): each read which stages were done before taking the lock,
    so both published a new intermediate, and the second issue stage put the old one back in force — parked in
    rollover/ to be retired, perhaps because its key was stolen — while both runs and `pki check` said all was
    well. Here the second run reaches the lock while the first is publishing."""
    layout, policy = Layout(tmp_path / "pki"), Policy.load(policy_file(tmp_path))
    init(layout, policy)
    old_key = layout.intermediate_key.read_bytes()
    second_waits, logs, failures = threading.Event(), [], []

    def lock(layout: Layout, holder: str):  # the rollover's lock, telling us when the second run is at it
        if threading.current_thread() is not threading.main_thread():
            second_waits.set()
        return pki_lock(layout, holder)

    def second_run() -> None:
        try:
            RollOver(layout, policy, services={}, log=logs.append).run()
        except Exception as e:  # reported by the assertion below
            failures.append(e)

    second = threading.Thread(target=second_run)

    def while_publishing() -> None:  # the first run's hook, called inside its stages
        if not second.is_alive() and not second_waits.is_set():
            second.start()
            assert second_waits.wait(timeout=30)

    monkeypatch.setattr("pki.rollover.pki_lock", lock)
    for module in ("pki.rollover", "pki.renewal"):  # no service to wait for
        monkeypatch.setattr(f"{module}.ROTATION_GRACE", dt.timedelta(0))
    RollOver(layout, policy, services={}, after_each_stage=while_publishing, log=lambda _: None).run()
    second.join(timeout=120)
    assert not second.is_alive() and not failures, failures
    assert_rolled_over(layout, policy, old_key)


STOPS = {  # how a rollover is stopped: (the stage, what raises there, and on which call)
    "at the issue gate": ("issue", RollOver, "_gate", lambda args, calls: args[1] == "issue"),
    "killed mid-switch": ("issue", rollover_module, "write_file", lambda args, calls: args[0].name == "intermediate.crt"
                          and args[0].parent.name != "rollover"),  # the new key in force, its certificate not yet
    "killed after the switch": ("issue", Renewer, "renew", lambda args, calls: True),
    "killed mid-renewal": ("issue", renewal_module, "rotate_finish", lambda args, calls: calls == 2),
    "killed ending a renewal": ("issue", Path, "unlink", lambda args, calls: args[0].parent.name == "next"),
    "at the retire gate": ("retire", RollOver, "_gate", lambda args, calls: args[1] == "retire"),
    "killed cleaning up": ("retire", shutil, "rmtree", lambda args, calls: Path(args[0]).name == ".rollover-finished"
                           and Path(args[0]).exists()),
}  # fmt: skip


@pytest.mark.parametrize("stopped", list(STOPS))
def test_a_ca_rollover_stopped_midway_carries_on_when_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped: str
) -> None:
    """`rotate-ca` stopped — a gate that timed out, or the process killed — says "run it again to continue".
    Found by attack: run again after its issue stage, it swapped the intermediates a second time, putting the
    old one back in force and retiring the new (exit 0, `pki check` content); after its retire gate, it began a
    whole new rollover; killed while it renewed, it left the old leaves listed; killed while it removed
    rollover/, it left one no run could finish. Now it carries on with the same new intermediate."""
    layout, policy = Layout(tmp_path / "pki"), Policy.load(policy_file(tmp_path))
    init(layout, policy)
    old_key = layout.intermediate_key.read_bytes()
    for module in ("pki.rollover", "pki.renewal"):  # no service to wait for
        monkeypatch.setattr(f"{module}.ROTATION_GRACE", dt.timedelta(0))
    stage, owner, name, here = STOPS[stopped]
    real, calls, stops = getattr(owner, name), [], []

    def stop_once(*args: object, **kwargs: object) -> object:  # args: (self, …) for a method
        calls.append(args)
        if not stops and here(args, len(calls)):
            stops.append(stage)
            raise PKIError(f"stopped {stopped}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, stop_once)
    with pytest.raises(PKIError, match="stopped"):
        RollOver(layout, policy, services={}, log=lambda _: None).run()
    in_force = layout.intermediate_key.read_bytes()
    if stopped == "killed mid-switch":  # whatever needs the CA meanwhile says how to finish, not to start anew
        with pytest.raises(PKIError, match="run `make rotate-ca` again"):
            load_issuer(layout)
    RollOver(layout, policy, services={}, log=lambda _: None).run()
    assert stops == [stage]
    if stopped == "killed cleaning up":  # it had finished: the run again is a rollover of its own, and clears up
        assert not (layout.out / ".rollover-finished").exists()
    elif stage == "retire":  # done but for its gate: the run again starts no other
        assert layout.intermediate_key.read_bytes() == in_force, "a second rollover began"
    assert_rolled_over(layout, policy, old_key)


def assert_rolled_over(layout: Layout, policy: Policy, old_key: bytes) -> None:
    """A CA rollover is over: a new intermediate in force, alone in crl.pem, every identity its, nothing left
    under way."""
    assert layout.intermediate_key.read_bytes() != old_key, "the old intermediate is in force again"
    assert not layout.rollover.exists(), "a rollover is left under way"
    assert not list((layout.out / "previous").glob("*.crt")), "the old intermediate's leaves are still listed"
    intermediate = load_certificates(layout.intermediate_cert)[0]
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    assert load_key(layout.intermediate_key).public_key().public_bytes(*spki) == intermediate.public_key().public_bytes(
        *spki
    ), "the intermediate's key is not its certificate's"
    issuer = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    crls = [x509.load_pem_x509_crl(block) for block in crl_blocks(layout.crl.read_bytes())]
    assert [authority_key_id(crl) for crl in crls] == [issuer], "crl.pem is not the new intermediate's alone"
    for name in [*policy.services, *policy.clients]:
        assert authority_key_id(load_certificates(layout.cert(name))[0]) == issuer, f"{name}: not the new CA's"
    assert_consistent(layout, policy)


def assert_consistent(layout: Layout, policy: Policy) -> None:
    """Every key matches its certificate, every certificate in use is in the ledger and none is revoked, no
    rotation is left half-done, and no allow-list pins a revoked certificate."""
    ledger = {e.sha256: e for e in entries(layout)}
    serials = revoked(layout)
    pinned = {sha for s in policy.services for sha in AllowList.load(layout.allow_list(s)).entries}
    for name in [*policy.services, *policy.clients]:
        cert = load_certificates(layout.cert(name))[0]
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        assert load_key(layout.key(name)).public_key().public_bytes(serialization.Encoding.PEM, public) == (
            cert.public_key().public_bytes(serialization.Encoding.PEM, public)
        ), f"{name}: key and certificate do not match"
        assert thumbprint(cert) in ledger, f"{name}'s certificate is not in the ledger"
        assert f"{cert.serial_number:x}" not in serials, f"{name}'s certificate in use is revoked"
    assert not list((layout.out / "next").glob("*")), "a rotation was left half-done"
    assert not {ledger[sha].serial for sha in pinned if sha in ledger} & set(serials), "a revoked pin is listed"


def test_a_command_run_by_the_lock_holder_acts_on_its_behalf(tmp_path: Path) -> None:
    """`rotate-ca --after-each-stage "make deploy-if-up"` runs the pki job while a stage holds the lock: the
    child must not wait for a lock its own parent holds until the child is done."""
    layout = Layout(tmp_path / "pki")
    init(layout)
    with pki_lock(layout, "a rollover stage"):
        done = subprocess.run(
            [sys.executable, "-m", "pki", "--out", str(layout.out), "render"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert done.returncode == 0 and "waiting" not in done.stderr, done.stderr


def test_the_renewer_leaves_a_rotation_under_way_alone_unless_abandoned(tmp_path: Path) -> None:
    """`make rotate` runs begin and finish as two commands: renewing in between would take their successor."""
    policy = Policy.load(policy_file(tmp_path, lifetime="2s"))
    layout = Layout(tmp_path / "pki")
    init(layout, policy)
    rotate_begin(layout, policy, "client")
    successor = layout.next_cert("client").read_bytes()
    renewer = Renewer(layout, policy, wait=lambda _: None)
    wait_until(lambda: "client" in due(layout, policy), timeout=5)
    renewer.tick()
    assert layout.next_cert("client").read_bytes() == successor, "the renewer took over a rotation under way"
    old = time.time() - ABANDONED.total_seconds() - 1
    os.utime(layout.next_cert("client"), (old, old))  # begun long ago, never finished: a killed `make rotate`
    renewer.tick()
    assert not layout.next_cert("client").exists()
    assert load_certificates(layout.cert("client"))[0].public_bytes(serialization.Encoding.PEM) not in successor


# ── found by the independent attack on these fixes ───────────────────────────────────────────────────────────


def test_a_forged_file_with_our_key_id_and_a_live_serial_revokes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pki revoke --cert` must judge the file by its signature: its AKI and serial are anyone's to copy, and
    revoking that serial would cut off service-a, which holds it."""
    out = tmp_path / "pki"
    assert main(["--out", str(out), "init"]) == 0
    layout = Layout(out)
    live, issuer = load_certificates(layout.cert("service-a"))[0], load_certificates(layout.intermediate_cert)[0]
    key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateBuilder()
        .subject_name(live.subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(live.serial_number)
        .not_valid_before(live.not_valid_before_utc)
        .not_valid_after(live.not_valid_after_utc)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "forged.crt"
    path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    crl = layout.crl.read_bytes()
    capsys.readouterr()
    assert main(["--out", str(out), "revoke", "--cert", str(path)]) == 1
    assert "not a certificate this CA issued" in capsys.readouterr().err
    assert revoked(layout) == {} and layout.crl.read_bytes() == crl


@pytest.mark.e2e
def test_a_crl_signed_by_a_stray_ca_key_is_refused_and_revocations_stay(tmp_path: Path) -> None:
    """intermediate.key restored from the wrong backup: `pki` must not sign with it; and a crl.pem signed by such
    a key anyway is refused by the service. Taken in, it dropped the CA's real CRL — every peer refused — and
    with it the floor, so that an older crl.pem put back afterwards un-revoked a stolen key."""
    policy = policy_file(tmp_path)
    layout = Layout(tmp_path / "pki")
    init(layout, Policy.load(policy))
    backup = tmp_path / "crl-backup.pem"  # from before the revocation
    shutil.copy(layout.crl, backup)
    stolen = Credentials(tmp_path / "stolen.crt", tmp_path / "stolen.key")
    shutil.copy(layout.cert("client"), stolen.cert)
    shutil.copy(layout.key("client"), stolen.key)
    envs = chain_environments(ports(2), layout.out, names=["service-a", "service-b"], MESH_RELOAD_INTERVAL="0.25")[:1]
    with running(start_services(envs, tmp_path)) as [process]:
        a = Service(process)

        def answer(who: Credentials) -> int | str:
            try:
                return get(f"{a.url}/healthz", "service-a", attacker_context(layout.ca_cert, who)).status_code
            except TLS_REFUSALS as refused:
                return type(refused).__name__

        operator = Credentials(layout.cert("operator"), layout.key("operator"))
        pki(layout, policy, "revoke", "client")
        wait_until(lambda: answer(stolen) != 200, describe=lambda: "the stolen client is still let in")

        stray = ec.generate_private_key(ec.SECP256R1())
        real_key = layout.intermediate_key.read_bytes()
        layout.intermediate_key.write_bytes(
            stray.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        crl = layout.crl.read_bytes()
        refused = pki(layout, policy, "revoke", "operator", check=False)
        assert refused.returncode == 1 and "does not belong to" in refused.stderr, refused.stderr
        assert layout.crl.read_bytes() == crl, "pki signed with a key that is not its CA's"
        layout.intermediate_key.write_bytes(real_key)

        # The same CRL as `pki` would have signed with that key, written by other means.
        issuer = load_certificates(layout.intermediate_cert)[0]
        now = dt.datetime.now(dt.UTC)
        forged = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=1))
            .add_extension(x509.CRLNumber(10**6), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(stray.public_key()), critical=False)
            .sign(stray, hashes.SHA256())
        )
        mark = a.mark()
        layout.crl.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
        wait_until(lambda: a.events_since(mark, "reload_refused"), describe=lambda: str(a.events_since(mark)))
        assert "no CRL signed by" in str(a.events_since(mark, "reload_refused"))
        assert answer(operator) == 200, "a CRL from a stray key took the service down"

        mark = a.mark()
        layout.crl.write_bytes(backup.read_bytes())  # the older backup, put back to "repair" it
        wait_until(lambda: a.events_since(mark, "reload_refused"), describe=lambda: str(a.events_since(mark)))
        assert answer(stolen) != 200, "an older crl.pem un-revoked the stolen key"
        assert answer(operator) == 200
