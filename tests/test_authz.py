"""Authorization decisions and allow-list files, without a network: deny by default, explain every denial."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.authz import AllowList, Authorizers, authorize_all, authorize_client_leaf, authorize_listed
from shared.layout import Layout
from shared.x509 import MaterialError, PeerIdentity, load_certificates

pytestmark = pytest.mark.fast  # in-process: part of `make test-fast`

A, B = "a" * 64, "b" * 64


def identity(sha256: str = A, *, is_leaf: bool = True, client_auth: bool = True) -> PeerIdentity:
    return PeerIdentity(
        sha256=sha256,
        subject="CN=x,O=mtls-mesh",
        spiffe_id=None,
        svid_problem="an X509-SVID has exactly one URI SAN; this certificate has 0",
        dns_names=(),
        is_leaf=is_leaf,
        client_auth=client_auth,
    )


def allow_list(tmp_path: Path, text: str) -> AllowList:
    path = tmp_path / "allow.txt"
    path.write_text(text)
    return AllowList.load(path)


def test_allow_list_formats_and_comments(tmp_path: Path) -> None:
    colons = ":".join(["BB"] * 32)
    entries = allow_list(tmp_path, f"# header\n\n{A}  # service-a\n   {colons}\n").entries
    assert entries == {A: "service-a", B: ""}


@pytest.mark.parametrize("line", ["not-a-thumbprint", "a" * 63, A + " " + B, "sha256:" + A])
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path: Path, line: str) -> None:
    with pytest.raises(MaterialError, match=r"allow\.txt:3: .*not a SHA-256 thumbprint"):
        allow_list(tmp_path, f"# header\n{A}\n{line}\n")


def test_missing_allow_list_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MaterialError, match=r"missing\.txt: allow-list not found — run `make pki`"):
        AllowList.load(tmp_path / "missing.txt")


def test_empty_allow_list_admits_nobody(tmp_path: Path) -> None:
    decide = authorize_listed(allow_list(tmp_path, "# nobody\n"))
    assert not decide(identity(A)).allowed


def test_listed_is_allowed_unlisted_denied_with_reasons(tmp_path: Path) -> None:
    decide = authorize_listed(allow_list(tmp_path, f"{A}  # service-a\n"))
    allowed, denied = decide(identity(A)), decide(identity(B))
    assert allowed.allowed and "service-a" in allowed.reason
    assert not denied.allowed and "not on the allow-list allow.txt" in denied.reason


def test_a_ca_certificate_is_refused_even_when_listed(tmp_path: Path) -> None:
    decide = authorize_all(authorize_client_leaf(), authorize_listed(allow_list(tmp_path, f"{A}\n")))
    decision = decide(identity(A, is_leaf=False))
    assert not decision.allowed and "CA certificate" in decision.reason


def test_a_certificate_without_client_auth_is_refused_even_when_listed(tmp_path: Path) -> None:
    decide = authorize_all(authorize_client_leaf(), authorize_listed(allow_list(tmp_path, f"{A}\n")))
    decision = decide(identity(A, client_auth=False))
    assert not decision.allowed and "clientAuth" in decision.reason


def test_an_allow_list_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "allow.txt").write_bytes(b"\xff" + A.encode() + b"\n")
    with pytest.raises(MaterialError, match=r"allow\.txt: allow-list is not UTF-8 text"):
        AllowList.load(tmp_path / "allow.txt")


def test_a_comment_cannot_hide_an_entry_behind_a_unicode_line_break(tmp_path: Path) -> None:
    """Editors and `cat` show U+2028 inside the comment: only \\n ends a line, so B is no entry."""
    assert set(allow_list(tmp_path, f"{A}  # service-a\u2028{B}\n").entries) == {A}


def test_a_caller_without_a_spiffe_id_is_told_so_by_a_list_of_names(tmp_path: Path) -> None:
    decision = authorize_listed(allow_list(tmp_path, "spiffe://mesh.internal/service-a\n"))(identity(B))
    assert not decision.allowed and decision.code == "no_spiffe_id" and "has no SPIFFE ID" in decision.reason


def test_a_reload_replaces_an_authorizer_and_never_adds_one() -> None:
    authorizers = Authorizers(api=authorize_all())
    allow_all = authorize_client_leaf()
    authorizers.replace("api", allow_all)
    assert authorizers["api"] is allow_all
    with pytest.raises(KeyError, match="never add one"):
        authorizers.replace("metrics", allow_all)


def test_authorize_all_of_nothing_denies() -> None:
    assert not authorize_all()(identity()).allowed


def test_identity_from_a_real_certificate(layout: Layout) -> None:
    intermediate = load_certificates(layout.intermediate_cert)[0]
    leaf = load_certificates(layout.cert("service-b"))[0]
    caller = PeerIdentity.from_certificate(leaf)
    assert caller.spiffe_id == "spiffe://mesh.internal/service-b"
    assert caller.dns_names == ("service-b", "localhost")
    assert caller.is_leaf and caller.client_auth
    assert not PeerIdentity.from_certificate(intermediate).is_leaf
