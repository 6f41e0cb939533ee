"""`python -m pki check`, the doctor: each fault planted on a copy of one PKI, found with its fix; the writing
commands refuse to run on what no command repairs, and `init` says "up to date" only when all is in order."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest

from pki import CertificateAuthority, Policy, init
from pki.__main__ import main
from pki.output import write_file
from pki.policy import POLICY_FILE
from pki.revocation import first_crl, write_crl
from shared.layout import Layout
from tests.support import wait_until

POLICY = Policy.load()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("check-template") / "pki")
    init(layout, POLICY)
    return layout


@pytest.fixture
def layout(template: Layout, tmp_path: Path) -> Layout:
    shutil.copytree(template.out, tmp_path / "pki", symlinks=True)
    return Layout(tmp_path / "pki")


def pki(layout: Layout, capsys: pytest.CaptureFixture[str], *args: str, policy: Path = POLICY_FILE) -> tuple[int, str]:
    code = main(["--out", str(layout.out), "--policy", str(policy), *args])
    said = capsys.readouterr()
    return code, said.out + said.err


def test_a_pki_in_order(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    code, said = pki(layout, capsys, "check")
    assert code == 0 and said.startswith("✔ ") and said.endswith(": all is well\n") and "✖" not in said
    code, said = pki(layout, capsys, "init")
    assert code == 0 and "up to date" in said


MISTAKES = {  # what is changed in pki/policy.toml → the line it is on, what must be said
    "misspelled-key": (('leaf_lifetime = "90d"', 'leaf_lifetme = "90d"'), "did you mean `leaf_lifetime`?"),
    "misspelled-tokens-key": (('lifetime = "5m"', 'lifetim = "5m"'), "unknown [tokens] key `lifetim`"),
    "toml-error": (('clients = ["client", "operator"]', 'clients = ["client", "operator"'), "Unclosed array"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_policy_mistake_is_named_with_its_line_and_nothing_is_written(
    layout: Layout,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    mistake: str,
) -> None:
    (right, wrong), message = MISTAKES[mistake]
    text = POLICY_FILE.read_text().replace(right, wrong)
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    number = next(n for n, content in enumerate(text.split("\n"), 1) if content == wrong)
    code, said = pki(layout, capsys, "check", policy=policy)
    assert code == 1 and f"{policy}:{number}: " in said and message in said, said
    before = {p: p.read_bytes() for p in layout.out.rglob("*") if p.is_file()}
    code, said = pki(layout, capsys, "render", policy=policy)
    assert code == 1 and "nothing was written" in said and message in said
    assert {p: p.read_bytes() for p in layout.out.rglob("*") if p.is_file()} == before


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_root_on_files_it_does_not_own_as_the_compose_pki_job_is(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Docker pki job runs `init` as root on your checkout's pki/out: your files are no fault of the PKI."""
    for path in [layout.out, *layout.out.rglob("*")]:
        os.chown(path, 12345, 12345)
    code, said = pki(layout, capsys, "check")
    assert code == 0, said
    assert pki(layout, capsys, "init")[0] == 0


def test_a_key_others_can_read_stops_every_writer(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    layout.key("service-a").chmod(0o644)
    code, said = pki(layout, capsys, "check")
    assert code == 1 and f"{layout.key('service-a')}: private key is accessible by other users" in said
    assert "chmod 600" in said
    code, said = pki(layout, capsys, "revoke", "client")
    assert code == 1 and "nothing was written" in said
    assert "client" not in (layout.out / "revocations.json").read_text()


def test_a_directory_others_can_write(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    (layout.out / "allow").chmod(0o777)
    code, said = pki(layout, capsys, "check")
    assert code == 1 and f"{layout.out / 'allow'}: directory writable by other users" in said
    assert pki(layout, capsys, "init")[0] == 1


def test_an_intermediate_key_that_is_not_its_certificates(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    write_file(layout.intermediate_key, CertificateAuthority.root("Stray").key_pem(), private=True)
    code, said = pki(layout, capsys, "check")
    assert code == 1 and f"{layout.intermediate_key} does not belong to {layout.intermediate_cert}" in said
    code, said = pki(layout, capsys, "init")
    assert code == 1 and "nothing was written" in said and "up to date" not in said


def test_a_leaf_from_a_ca_no_longer_trusted(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    old = CertificateAuthority.root().intermediate()  # the same names as ours, another key: a CA replaced since
    old.issue("service-b", dns=["service-b"], uris=[POLICY.spiffe_id("service-b")]).write(layout.out, "service-b")
    code, said = pki(layout, capsys, "check")
    assert code == 1 and "service-b: " in said and "✖" in said
    code, said = pki(layout, capsys, "init")  # keeps the leaf: so it must not say "up to date"
    assert code == 1 and "up to date" not in said and "service-b" in said


def test_a_leaf_whose_chain_leads_to_no_trusted_root(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    """Its CA's CRL is in crl.pem (as during a rollover), so it loads; but its root is not in ca.crt."""
    retired = CertificateAuthority.root().intermediate("Retired Intermediate CA")
    retired.issue("client", usages=["client"], uris=[POLICY.spiffe_id("client")]).write(layout.out, "client")
    write_file(layout.crl, layout.crl.read_bytes() + first_crl(retired))
    code, said = pki(layout, capsys, "check")
    assert code == 1 and f"{layout.cert('client')}: its chain does not lead to a CA of {layout.ca_cert}" in said


def test_a_crl_from_another_key_is_found_and_init_re_signs_it(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    stray = CertificateAuthority.root().intermediate()  # our intermediate's name, another key
    write_file(layout.crl, first_crl(stray))
    code, said = pki(layout, capsys, "check")
    assert code == 1 and "is not signed by our intermediate's key" in said and "`make pki` re-signs it" in said
    code, said = pki(layout, capsys, "init")
    assert code == 0 and "created: crl" in said and "up to date" in said
    assert pki(layout, capsys, "check")[0] == 0


def test_an_expired_crl(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    write_crl(layout, dt.timedelta(seconds=1))
    wait_until(lambda: pki(layout, capsys, "check")[0] == 1, timeout=5)
    said = pki(layout, capsys, "check")[1]
    assert "expired on" in said and "run `make pki` to re-sign it" in said
    assert said.count("expired on") == 1, "one line for the CRL, naming every identity whose files hold it"


def test_an_allow_list_edited_by_hand(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    listed = layout.allow_list("service-c")
    write_file(listed, listed.read_bytes() + f"{'ab' * 32}  # added by hand\n".encode())
    code, said = pki(layout, capsys, "check")
    assert code == 1 and f"{listed}: not what the policy renders" in said
    assert pki(layout, capsys, "render")[0] == 0
    assert pki(layout, capsys, "check")[0] == 0


def test_a_ca_file_others_can_write_is_found_and_left_alone(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    os.chmod(layout.ca_cert, 0o666)
    before = {p: (p.read_bytes(), p.stat().st_mode) for p in layout.out.rglob("*") if p.is_file()}
    code, said = pki(layout, capsys, "check")
    assert code == 1 and f"{layout.ca_cert}: file is writable by other users" in said
    assert {p: (p.read_bytes(), p.stat().st_mode) for p in layout.out.rglob("*") if p.is_file()} == before
