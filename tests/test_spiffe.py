"""SPIFFE IDs and X509-SVIDs, by the rules of the standard; and authorization by name, without a network."""

from __future__ import annotations

from pathlib import Path

import pytest

from pki import Policy, init
from shared.authz import AllowList, authorize_id, authorize_ids, authorize_listed
from shared.layout import Layout
from shared.x509 import InvalidSpiffeId, InvalidSvid, MaterialError, PeerIdentity, SpiffeId, load_certificates, svid_id
from tests.support import leaf

pytestmark = pytest.mark.fast  # in-process: part of `make test-fast`

POLICY = Policy.load()

# The examples of SPIFFE-ID.md (github.com/spiffe/spiffe, standards/), every one valid.
SPEC_EXAMPLES = [
    "spiffe://trust-domain-name/path",
    "spiffe://staging.example.com/payments/mysql",
    "spiffe://staging.example.com/payments/web-fe",
    "spiffe://k8s-west.example.com/ns/staging/sa/default",
    "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
    "spiffe://example.com",  # a trust domain alone: the ID of its signing authority
]


@pytest.mark.parametrize("text", SPEC_EXAMPLES)
def test_the_specifications_examples_are_spiffe_ids(text: str) -> None:
    assert str(SpiffeId.parse(text)) == text


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("https://mesh.internal/service-a", "scheme"),
        ("SPIFFE://mesh.internal/service-a", "scheme"),
        ("spiffe:///service-a", "trust domain is empty"),
        ("spiffe://MESH.internal/service-a", "may hold only a-z"),
        ("spiffe://mesh internal/service-a", "may hold only a-z"),
        ("spiffe://user@mesh.internal/service-a", "user info"),
        ("spiffe://mesh.internal:8443/service-a", "port"),
        ("spiffe://mesh.internal/service-a?x=1", "query or fragment"),
        ("spiffe://mesh.internal/service-a#x", "query or fragment"),
        ("spiffe://mesh.internal//service-a", "empty segment"),
        ("spiffe://mesh.internal/service-a/", "empty segment"),
        ("spiffe://mesh.internal/../service-a", "'.' or '..'"),
        ("spiffe://mesh.internal/./service-a", "'.' or '..'"),
        ("spiffe://mesh.internal/service a", "may hold only A-Z"),
        ("spiffe://mesh.internal/" + "a" * 2048, "longer than 2048"),
    ],
)
def test_what_is_not_a_spiffe_id_and_why(text: str, rule: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=rule.replace("?", r"\?").replace(".", r"\.")):
        SpiffeId.parse(text)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("pki"))
    init(layout, POLICY)
    return layout


def test_an_issued_identity_is_an_svid(layout: Layout) -> None:
    cert = load_certificates(layout.cert("service-a"))[0]
    assert svid_id(cert) == SpiffeId("mesh.internal", "/service-a")


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"uris": []}, "exactly one URI SAN; this certificate has 0"),
        (
            {"uris": ["spiffe://mesh.internal/a", "spiffe://mesh.internal/b"]},
            "exactly one URI SAN; this certificate has 2",
        ),
        ({"uris": ["https://mesh.internal/a"]}, "is no SPIFFE ID: the scheme"),
        ({"uris": ["spiffe://mesh.internal/a"], "ca": True}, "CA certificate"),
        ({"uris": ["spiffe://mesh.internal/a"], "key_cert_sign": True}, "keyCertSign or cRLSign"),
    ],
)
def test_a_certificate_that_breaks_an_svid_rule_has_no_spiffe_id(layout: Layout, kwargs: dict, rule: str) -> None:
    cert = leaf(layout, **kwargs)
    with pytest.raises(InvalidSvid, match=rule):
        svid_id(cert)
    caller = PeerIdentity.from_certificate(cert)
    assert caller.spiffe_id is None and rule.split(";")[0] in (caller.svid_problem or "")


def caller_with(layout: Layout, uri: str) -> PeerIdentity:
    return PeerIdentity.from_certificate(leaf(layout, uris=[uri]))


def test_authorizers_by_name(layout: Layout) -> None:
    a, b = SpiffeId.parse("spiffe://mesh.internal/a"), SpiffeId.parse("spiffe://mesh.internal/b")
    as_a, foreign = caller_with(layout, str(a)), caller_with(layout, "spiffe://other.internal/a")
    assert authorize_id(a)(as_a).allowed
    assert not authorize_id(b)(as_a).allowed
    assert authorize_ids(b, a)(as_a).allowed
    decision = authorize_id(a)(foreign)  # the same path in another trust domain is someone else
    assert (
        not decision.allowed
        and decision.reason == "SPIFFE ID spiffe://other.internal/a is not spiffe://mesh.internal/a"
    )
    no_svid = PeerIdentity.from_certificate(leaf(layout, uris=[]))
    decision = authorize_id(a)(no_svid)
    assert not decision.allowed and "no SPIFFE ID" in decision.reason


def test_allow_lists_mix_pins_and_names(layout: Layout, tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(f"# header\n{'a' * 64}  # a pin\nspiffe://mesh.internal/a   # a name\n")
    path.chmod(0o644)
    allow = AllowList.load(path)
    assert set(allow.entries) == {"a" * 64} and set(allow.ids) == {SpiffeId("mesh.internal", "/a")}
    decision = authorize_listed(allow)(caller_with(layout, "spiffe://mesh.internal/a"))
    assert decision.allowed and decision.code == "listed_spiffe_id"
    decision = authorize_listed(allow)(caller_with(layout, "spiffe://mesh.internal/b"))
    assert not decision.allowed and decision.code == "not_listed"


@pytest.mark.parametrize(
    "line", ["spiffe://MESH.internal/a", "spiffe://mesh.internal/a#frag", "spiffe://mesh.internal/../a", "spiffe:/a"]
)
def test_a_malformed_spiffe_id_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(f"# header\nspiffe://mesh.internal/ok\n{line}  # x\n")
    path.chmod(0o644)
    with pytest.raises(MaterialError, match=r"allow\.txt:3: not a SPIFFE ID"):
        AllowList.load(path)
