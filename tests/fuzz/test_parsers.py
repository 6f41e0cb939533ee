"""Fuzzing the parsers of untrusted text in-process: SPIFFE IDs, allow-list lines, policy.toml, user tokens.

Each property says what the parser may *accept*, not only that it does not crash: a SPIFFE ID is accepted
exactly when the specification's grammar matches it; an allow-list admits only identities literally on a line;
a policy loads into well-typed names or fails with PKIError naming the file; a token passes only with our
signature and every claim rule met, and is refused (TokenRefused, nothing else) when any byte of it changes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import re
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given, note
from hypothesis import strategies as st

from pki.authority import PKIError
from pki.policy import AUTHORIZE_BY, IDENTITY_NAME, POLICY_FILE, Policy
from shared.authz import AllowList, authorize_listed
from shared.tokens import MAX_ACTORS, TokenClient, TokenRefused, verify
from shared.x509 import MAX_LENGTH, InvalidSpiffeId, MaterialError, PeerIdentity, SpiffeId, normalise_thumbprint
from tests.fuzz.profiles import examples
from tests.fuzz.tokens import (
    AUDIENCE,
    DELETE,
    ISSUER,
    KEY,
    KEYS,
    NOW,
    assert_acceptable,
    changed,
    claim_changes,
    good_claims,
    good_header,
    header_changes,
    signers,
)
from tests.support import forge

# ── SPIFFE IDs ───────────────────────────────────────────────────────────────────────────────────────────────

# SPIFFE-ID.md, restated here as the oracle: scheme, a trust domain of [a-z0-9._-], path segments of
# [A-Za-z0-9._-] that are neither "." nor ".."; nothing else (no port, user info, query, fragment, empty segment).
SPEC_ID = re.compile(r"spiffe://[a-z0-9._-]+(?P<path>(?:/[A-Za-z0-9._-]+)*)")
DOT_SEGMENT = re.compile(r"/\.\.?(?=/|$)")


def spec_allows(text: str) -> bool:
    match = SPEC_ID.fullmatch(text)
    return bool(match) and not DOT_SEGMENT.search(match["path"]) and len(text.encode()) <= MAX_LENGTH


# Characters that matter to the grammar, plus a few that must never pass: mostly near-misses, not random noise.
NEAR = "spifeSPIFE:/.-_az09AZ@?#%+ \t\n\x00é\x85\u2028"
trust_domains = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12)
segments = st.text("abcXYZ0129._-", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
valid_ids = st.builds(
    lambda td, path: f"spiffe://{td}" + "".join(f"/{s}" for s in path), trust_domains, st.lists(segments, max_size=4)
)
# IDs that break exactly one rule: a bad segment somewhere in the path, or a bad trust domain.
BAD_SEGMENTS = [".", "..", "", "%2e%2e", "a b", "é", "a?b", "a#b", "a:b", "a@b", "a\x00"]
BAD_TRUST_DOMAINS = ["MESH", "Mesh.internal", "mesh:8443", "user@mesh", "", "mesh/", "mésh", "mesh internal"]
one_rule_broken = st.one_of(
    st.builds(
        lambda td, path, bad, at: f"spiffe://{td}" + "".join(f"/{s}" for s in [*path[:at], bad, *path[at:]]),
        trust_domains,
        st.lists(segments, max_size=3),
        st.sampled_from(BAD_SEGMENTS),
        st.integers(0, 3),
    ),
    st.builds(lambda td, path: f"spiffe://{td}{path}", st.sampled_from(BAD_TRUST_DOMAINS), st.sampled_from(["", "/a"])),
)
spiffe_texts = st.one_of(
    valid_ids,
    one_rule_broken,
    st.builds(lambda s: f"spiffe://{s}", st.text(NEAR, max_size=30)),
    st.builds(lambda v, i, s: v[:i] + s + v[i:], valid_ids, st.integers(0, 60), st.text(NEAR, min_size=1, max_size=3)),
    st.text(NEAR, max_size=30),
    st.text(max_size=30),
)


@examples(300)
@given(spiffe_texts)
@example("spiffe://mesh.internal/../service-a")
@example("spiffe://mesh.internal/a/./b")
@example("spiffe://mesh.internal:8443/a")
@example("spiffe://mesh.internal/" + "a" * MAX_LENGTH)
@example("spiffe://.")  # a trust domain of dots only is allowed; a path segment of dots is not
def test_a_spiffe_id_is_accepted_exactly_when_the_specification_allows_it(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except InvalidSpiffeId:
        assert not spec_allows(text), f"{text!r} is a SPIFFE ID by the specification, but was refused"
        return
    assert spec_allows(text), f"{text!r} breaks the specification, but parsed as {parsed!r}"
    assert str(parsed) == text  # round-trips: what is logged and compared is what was written
    assert SpiffeId.parse(str(parsed)) == parsed


# ── allow-list lines ──────────────────────────────────────────────────────────────────────────────────────────

hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
thumbprints = st.one_of(
    hex64,
    hex64.map(str.upper),
    hex64.map(lambda h: ":".join(h[i : i + 2] for i in range(0, 64, 2)).upper()),  # as openssl prints it
)


def _plain_value(value: str) -> bool:
    """A value as the line's author sees it: one line, no surrounding space, no comment inside."""
    return bool(value) and value == value.strip() and "\n" not in value and not re.search(r"(?:^|\s)#", value)


values = st.one_of(
    thumbprints,
    valid_ids,
    st.text(max_size=30).filter(_plain_value),
    st.builds(lambda v, junk: v + junk, valid_ids, st.text(NEAR, min_size=1, max_size=4)).filter(_plain_value),
    # A fragment or query glued on: no SPIFFE ID, and not a comment either (no space before the '#').
    st.builds(lambda v, mark, rest: f"{v}{mark}{rest}", valid_ids, st.sampled_from("#?"), segments),
)
# Comments carry names: a comment that holds a SPIFFE ID or a thumbprint must never list it. ("\n" ends the
# comment's line, and what follows is a line of its own; U+0085, U+2028 and the like do not.)
comment_texts = st.one_of(
    st.text(max_size=20),
    valid_ids,
    thumbprints,
    st.builds(str.__add__, st.text(NEAR, max_size=3), valid_ids),
    # What other programs take for the end of a line (str.splitlines() does), followed by a name.
    st.builds(
        str.__add__, st.sampled_from(["\r", "\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", "\u2029"]), valid_ids
    ),
).filter(lambda c: "\n" not in c)
comments = st.one_of(
    st.just(""), st.builds(lambda space, c: f"{space}#{c}", st.sampled_from([" ", "\t"]), comment_texts)
)
lines = st.one_of(
    st.builds(lambda v, c: (v, v + c), values, comments),  # (what it lists, the line)
    st.builds(lambda c: (None, c.lstrip()), comments),  # a comment line, or an empty one
)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A private directory for the files the parsers read (0600, ours, as shared.x509.files insists)."""
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


def _is_thumbprint(value: str) -> bool:
    try:
        normalise_thumbprint(value)
    except ValueError:
        return False
    return True


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


@examples(100)
@given(st.lists(lines, max_size=6), st.sampled_from(["\n", "\r\n"]), hex64, st.integers(0, 20), st.integers(0, 20))
@example(  # U+0085 ends a line for str.splitlines(), not for an editor: this comment listed a SPIFFE ID
    [("0" * 64, "0" * 64 + " #\x85spiffe://mesh.internal/intruder")], "\n", "1" * 64, 0, 1
).via("found by fuzzing")
def test_an_allow_list_admits_only_what_a_line_lists(
    scratch: Path, file_lines: list[tuple[str | None, str]], newline: str, other: str, pick_sha: int, pick_id: int
) -> None:
    path = _write(scratch / "allow.txt", newline.join(line for _, line in file_lines).encode("utf-8", "surrogatepass"))
    listed = [value for value, _ in file_lines if value is not None]
    try:
        allow_list = AllowList.load(path)
    except MaterialError as e:
        assert str(path) in str(e)  # refused whole, naming the file
        return
    listed_thumbprints = {normalise_thumbprint(v) for v in listed if _is_thumbprint(v)}
    assert set(allow_list.entries) <= listed_thumbprints
    assert {str(i) for i in allow_list.ids} <= set(listed)
    # Callers: listed ones, and the names that appear anywhere else in the file (comments) or nowhere.
    elsewhere = re.findall(r"spiffe://[^\s#]*", "\n".join(line for _, line in file_lines))
    shas = [*sorted(listed_thumbprints), other]
    # A caller's SPIFFE ID is one that parsed from its certificate (shared.x509.identity), or none.
    ids = [*filter(spec_allows, [*listed, *elsewhere]), "spiffe://mesh.internal/intruder", None]
    sha256, spiffe_id = shas[pick_sha % len(shas)], ids[pick_id % len(ids)]
    caller = PeerIdentity(sha256, "CN=fuzz", spiffe_id, None, (), is_leaf=True, client_auth=True)
    decision = authorize_listed(allow_list)(caller)
    note(f"{caller.sha256} {caller.spiffe_id}: {decision}")
    if decision.allowed:
        assert sha256 in listed_thumbprints or spiffe_id in listed, f"admitted {caller} although no line lists it"


# ── policy.toml ──────────────────────────────────────────────────────────────────────────────────────────────

SHIPPED_POLICY = tomllib.loads(POLICY_FILE.read_text())


def _toml(value: Any) -> str:
    """A TOML value (inline), for documents the fuzzer builds: tomllib reads, it does not write."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int | str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


names = st.sampled_from(["service-a", "service-b", "token-service", "client", "operator", "ca", "Service-A", "a b", ""])
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    names,
    st.sampled_from(["90d", "0d", "1h", "99999999999999d", "٣d", "spiffe-id", "thumbprint", "MESH.internal"]),
)
toml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=3)),
    max_leaves=8,
)
policy_keys = st.sampled_from(
    [
        ("trust_domain",),
        ("services",),
        ("services", 0),
        ("clients",),
        ("metrics",),
        ("authorize_by",),
        ("leaf_lifetime",),
        ("crl_lifetime",),
        ("loopback_sans",),
        ("allow",),
        ("allow", "service-a"),
        ("allow", "service-b", 0),
        ("tokens",),
        ("tokens", "edges"),
        ("tokens", "lifetime"),
        ("tokens", "users"),
        ("tokens", "users", "alice"),
        ("tokens", "users", "bob", 0),
    ]
)


durations = st.one_of(
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(-1, 10**20), st.sampled_from("dhmsy")),
    st.sampled_from(["0d", "٣d", "1.5h", "1 h", "", "d", "90D", "1000000000d", "9" * 30 + "s"]),
)


@st.composite
def policies(draw: st.DrawFn) -> str:
    """The shipped policy with one to three values replaced by anything TOML can say, or deleted."""
    document = json.loads(json.dumps(SHIPPED_POLICY))
    for _ in range(draw(st.integers(1, 3))):
        *parents, last = draw(policy_keys)
        try:
            node = document
            for key in parents:
                node = node[key]
            if draw(st.booleans()):
                del node[last]
            else:
                node[last] = draw(toml_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed the way there
    return "".join(f"{json.dumps(key)} = {_toml(value)}\n" for key, value in document.items())


@examples(100)
@given(st.one_of(policies(), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
@example("trust_domain = 0\nservices = []\n[allow]\n").via("found by fuzzing: an integer trust domain was accepted")
@example('trust_domain = "m"\nservices = [[]]\n[allow]\n').via("found by fuzzing: TypeError, unhashable list")
@example('trust_domain = "m"\nservices = "abc"\n[allow]\n').via("a string read as a list of letters")
@example('trust_domain = "m"\nservices = []\nleaf_lifetime = "99999999999d"\n[allow]\n').via("OverflowError")
def test_a_policy_loads_into_well_formed_names_or_fails_naming_the_file(scratch: Path, text: str) -> None:
    path = _write(scratch / "policy.toml", text.encode("utf-8", "surrogatepass"))
    try:
        policy = Policy.load(path)
    except PKIError as e:
        assert str(e).startswith(f"{path}:"), str(e)
        return
    assert isinstance(policy.trust_domain, str) and spec_allows(policy.spiffe_id("x"))
    for name in (*policy.services, *policy.clients):
        assert isinstance(name, str) and IDENTITY_NAME.fullmatch(name), name
    known = {*policy.services, *policy.clients}
    for callee, callers in policy.allow.items():
        assert {callee, *callers} <= known
    assert {*policy.metrics, *policy.edges} <= known
    for user, scopes in policy.users.items():
        assert IDENTITY_NAME.fullmatch(user) and set(scopes) <= set(policy.services), (user, scopes)
    assert policy.authorize_by in AUTHORIZE_BY
    assert policy.leaf_lifetime > dt.timedelta(0) and policy.token_lifetime > dt.timedelta(0)
    assert policy.crl_lifetime > dt.timedelta(0) and isinstance(policy.loopback_sans, bool)


@examples(60)
@given(durations, st.sampled_from(["leaf_lifetime", "crl_lifetime", "tokens.lifetime"]))
def test_a_lifetime_is_a_whole_number_and_a_unit_or_a_pki_error(scratch: Path, duration: str, key: str) -> None:
    document = json.loads(json.dumps(SHIPPED_POLICY))
    *table, name = key.split(".")
    (document[table[0]] if table else document)[name] = duration
    path = _write(scratch / "policy.toml", "".join(f"{k} = {_toml(v)}\n" for k, v in document.items()).encode())
    try:
        policy = Policy.load(path)
    except PKIError as e:
        assert str(e).startswith(f"{path}:"), str(e)
        return
    assert re.fullmatch(r"[1-9][0-9]*[dhms]", duration), f"{key} = {duration!r} was taken for a lifetime"
    lifetime = {"leaf_lifetime": policy.leaf_lifetime, "crl_lifetime": policy.crl_lifetime}.get(
        key, policy.token_lifetime
    )
    assert lifetime > dt.timedelta(0)


# ── user tokens ──────────────────────────────────────────────────────────────────────────────────────────────


@examples(200)
@given(st.one_of(st.just({}), header_changes), st.one_of(st.just({}), claim_changes), signers)
@example({}, {"exp": math.nan}, KEY).via("found by fuzzing: ValueError, and a NaN expiry never expires")
@example({}, {"exp": math.inf}, KEY).via("found by fuzzing: OverflowError")
@example({}, {"nbf": math.nan}, KEY).via("a NaN not-before was no rule at all")
@example({}, {"nbf": 10**400}, KEY).via("found by fuzzing the first fix: OverflowError in math.isfinite")
@example({}, {"exp": -(10**400)}, KEY).via("found by fuzzing: OverflowError in the expiry's message")
@example({"typ": DELETE}, {}, KEY).via("joserfc does not check typ: verify() must")
def test_a_token_passes_only_signed_by_us_with_every_claim_rule_met(
    header: dict[str, Any], claims: dict[str, Any], signer: Any
) -> None:
    header, claims = changed(good_header(), header), changed(good_claims(), claims)
    raw = forge(signer, header, claims)
    try:
        token = verify(raw, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW)
    except TokenRefused as refused:
        event(f"refused: {refused.reason[:30]}")
        return  # any other exception is a 500 in the service
    event("accepted")
    assert_acceptable(header, claims, signer)
    assert len(token.actors) <= MAX_ACTORS and all(isinstance(a, str) for a in token.actors)


GOOD_TOKEN = forge(KEY, good_header(), good_claims())
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@examples(200)
@given(st.integers(0, len(GOOD_TOKEN) - 1), st.sampled_from(BASE64URL + "=.+/ \x00é"))
def test_a_token_with_any_byte_changed_is_refused(position: int, replacement: str) -> None:
    raw = GOOD_TOKEN[:position] + replacement + GOOD_TOKEN[position + 1 :]
    if raw == GOOD_TOKEN:
        return
    with pytest.raises(TokenRefused):
        verify(raw, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW)


def test_the_unchanged_token_passes() -> None:
    """The two properties above would pass vacuously if nothing ever verified."""
    assert verify(GOOD_TOKEN, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW).subject == "alice"


class _TokenService:
    """Stands in for the Downstream a service's TokenClient fetches /jwks through: the key set, in-process."""

    name = "token-service"

    async def send(self, method: str, path: str, **_: Any) -> Any:
        return type("Response", (), {"content": json.dumps(KEYS.as_dict()).encode(), "status_code": 200})()

    def failure(self, reason: str) -> Exception:
        return RuntimeError(reason)


@examples(100)
@given(st.one_of(st.just({}), header_changes), claim_changes, signers)
@example({"kid": [KEY.kid]}, {}, KEY).via("issue 20 item 8: a kid that is a list was a TypeError (500)")
@example({"kid": {"kid": KEY.kid}}, {}, KEY).via("issue 20 item 8: …or an object")
def test_a_service_refuses_a_malformed_token_with_token_refused_only(
    header: dict[str, Any], claims: dict[str, Any], signer: Any
) -> None:
    """The path a service takes (shared.tokens.client: read the kid unverified, maybe fetch /jwks, verify)."""
    now = time.time()
    header, claims = changed(good_header(), header), changed(good_claims(now), claims)
    client = TokenClient(_TokenService(), ISSUER, lambda: 0)  # type: ignore[arg-type]
    try:
        asyncio.run(client.verify(forge(signer, header, claims), audience=AUDIENCE))
    except TokenRefused as refused:
        event(f"refused: {refused.reason[:30]}")
        return
    event("accepted")
    assert_acceptable(header, claims, signer, now)
