"""Fuzzing `POST /token`: the token service's app, driven in-process (httpx.ASGITransport), with every caller
identity of the mesh and forms made of the fields the grants read, near-misses of them, and bytes.

No socket: the app is the one `python -m services.token_service` serves, built from a real PKI, and each
request carries the caller's certificate the way shared.inbound.handshake hands it over (shared.inbound.expose). A 5xx
is a failure; so is a token granted that the token policy forbids — checked on the token itself, which must
verify, be bound to the caller, and name a user, audience and scopes the policy allows this caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import pytest
from hypothesis import event, example, given, note
from hypothesis import strategies as st
from joserfc.jwk import KeySet

from services.config import ServiceConfig
from services.token_policy import TokenPolicy
from services.token_service import create_token_app
from shared import tls
from shared.inbound import IDENTITY_KEY, expose
from shared.layout import Layout
from shared.tokens import (
    ACCESS_TOKEN_TYPE,
    EXCHANGE_GRANT,
    TOKEN_SERVICE,
    USER_GRANT,
    TokenRefused,
    UserToken,
    check_holder,
    verify,
)
from shared.x509 import PeerIdentity
from tests.fuzz.profiles import examples
from tests.support import Credentials, forge, identity_of, signing_key

CALLERS = ("client", "service-a", "service-b", "service-c", "operator")  # operator: on no token-service list


@dataclass
class TokenService:
    """The token service's app in-process, a caller → app-with-that-certificate map, and real tokens to trade."""

    loop: asyncio.AbstractEventLoop
    apps: dict[str, Any]
    callers: dict[str, PeerIdentity]
    policy: TokenPolicy
    issuer: str
    keys: KeySet
    given: dict[str, UserToken]  # raw → the verified token, as the service granted it: subject tokens to exchange

    def post(self, caller: str, body: bytes, content_type: str | None) -> httpx.Response:
        headers = {"Content-Type": content_type} if content_type else {}
        return self.loop.run_until_complete(self._send(caller, "POST", "/token", body, headers))

    async def _send(self, caller: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        # raise_app_exceptions=False: an exception in the app must show as what a caller would see, a 500.
        transport = httpx.ASGITransport(app=self.apps[caller], raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="https://token-service") as client:
            return await client.request(method, path, content=body, headers=headers)


def _extension(caller: PeerIdentity, pem: str) -> dict[str, Any]:
    return {"client_cert_chain": [pem], "tls_version": 0x0304, "cipher_suite": 0x1302, IDENTITY_KEY: caller}


@pytest.fixture(scope="module")
def token_service(layout: Layout) -> Iterator[TokenService]:
    config = ServiceConfig(name=TOKEN_SERVICE, pki_dir=layout.out)  # type: ignore[call-arg]
    live = tls.LiveTLS(config.tls, outgoing=False)
    app = create_token_app(config, live)
    callers = {name: identity_of(Credentials(layout.cert(name), layout.key(name))) for name in CALLERS}
    apps = {name: expose(app, _extension(callers[name], layout.cert(name).read_text())) for name in CALLERS}
    loop = asyncio.new_event_loop()
    service = TokenService(loop, apps, callers, TokenPolicy.load(layout.tokens_policy), "", KeySet([]), {})
    jwks = loop.run_until_complete(service._send("client", "GET", "/jwks", b"", {}))
    service.keys = KeySet.import_key_set(jwks.json())
    service.issuer = f"spiffe://{service.policy.trust_domain}/{TOKEN_SERVICE}"
    # Real tokens down the chain, each given to the next holder: client → A → B → C, for alice and for bob.
    for user in ("alice", "bob"):
        form = {"grant_type": USER_GRANT, "user": user, "audience": "service-a"}
        raw = _granted(service, "client", form, "service-a")
        for holder, audience in (("service-a", "service-b"), ("service-b", "service-c")):
            form = {"grant_type": EXCHANGE_GRANT, "subject_token_type": ACCESS_TOKEN_TYPE, "audience": audience}
            raw = _granted(service, holder, {**form, "subject_token": raw}, audience)
    try:
        yield service
    finally:
        loop.close()


def _granted(service: TokenService, caller: str, form: dict[str, str], audience: str) -> str:
    response = service.post(caller, urlencode(form).encode(), "application/x-www-form-urlencoded")
    assert response.status_code == 200, response.text
    raw = response.json()["access_token"]
    service.given[raw] = verify(raw, service.keys, issuer=service.issuer, audience=audience)
    return raw


# ── forms ────────────────────────────────────────────────────────────────────────────────────────────────────

junk = st.text(max_size=12)
# Half the time a name that can be granted, so that grants happen and the policy's checks are reached.
names = st.one_of(
    st.sampled_from(["service-a", "service-b", "service-c"]),
    st.sampled_from(["token-service", "client", "operator", "", "SERVICE-A", "service-a "]),
)
field_values = {
    "grant_type": st.one_of(
        st.sampled_from([USER_GRANT, EXCHANGE_GRANT, "client_credentials", USER_GRANT + " "]), junk
    ),
    "user": st.one_of(st.sampled_from(["alice", "bob"]), st.sampled_from(["mallory", "", "alice ", "Alice"]), junk),
    "audience": st.one_of(names, junk),
    "scope": st.one_of(
        st.lists(names, max_size=4).map(" ".join), st.sampled_from(["service-a  service-b", "\tservice-c"]), junk
    ),
    "subject_token_type": st.one_of(st.just(ACCESS_TOKEN_TYPE), junk),
}


@st.composite
def subject_tokens(draw: st.DrawFn, service: TokenService, caller: str) -> str:
    """A real token (mostly one given to `caller`), one with a character changed, or one we never signed."""
    own = sorted(raw for raw, token in service.given.items() if token.audience == caller)
    mine = own and draw(st.sampled_from([True, True, True, False]))
    real = draw(st.sampled_from(own if mine else sorted(service.given)))
    kind = draw(st.sampled_from(["real", "real", "real", "altered", "forged", "junk"]))
    if kind == "altered":
        at = draw(st.integers(0, len(real) - 1))
        return real[:at] + draw(st.sampled_from("AQgw-_.=")) + real[at + 1 :]
    if kind == "forged":  # signed by someone else's key, naming our kid, claiming anything
        claims = {**service.given[real].summary(), "aud": draw(names), "sub": draw(field_values["user"])}
        return forge(signing_key(), {"alg": "ES256", "typ": "at+jwt", "kid": service.keys.keys[0].kid}, claims)
    return real if kind == "real" else draw(junk)


@st.composite
def forms(draw: st.DrawFn, service: TokenService, caller: str) -> bytes:
    """A grant's form as `caller` would send it (often one the policy allows), then, half the time, up to three
    fields dropped, replaced, repeated or added."""
    callees = sorted(service.policy.may_call.get(caller, ())) or ["service-a"]
    # Mostly the grant this caller can get (an edge asks in a user's name, a service exchanges); else the other.
    if draw(st.sampled_from([True, True, False])) == (caller in service.policy.edges):
        user = draw(st.one_of(st.sampled_from(sorted(service.policy.users)), field_values["user"]))
        pairs = [("grant_type", USER_GRANT), ("user", user)]
    else:
        pairs = [
            ("grant_type", EXCHANGE_GRANT),
            ("subject_token", draw(subject_tokens(service, caller))),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
        ]
    pairs.append(("audience", draw(st.one_of(st.sampled_from(callees), names))))
    if draw(st.booleans()):
        pairs.append(("scope", draw(st.one_of(st.sampled_from(callees), field_values["scope"]))))
    changes = st.lists(st.sampled_from(["drop", "replace", "repeat", "add"]), min_size=1, max_size=3)
    for change in draw(changes) if draw(st.booleans()) else []:
        at = draw(st.integers(0, len(pairs) - 1)) if pairs else 0
        if change == "drop" and pairs:
            del pairs[at]
        elif change == "replace" and pairs:
            name = pairs[at][0]
            pairs[at] = (name, draw(field_values.get(name, junk)))
        elif change == "repeat" and pairs:
            pairs.insert(at, (pairs[at][0], draw(field_values.get(pairs[at][0], junk))))
        else:
            pairs.append(draw(st.tuples(st.sampled_from([*field_values, "extra", ""]), junk)))
    return urlencode(pairs).encode()


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(["grant_type=", "%", "%ZZ", "%C3%28", "&", "=", ";", "+", "user=alice", "\x00"])).map(
        lambda parts: "".join(parts).encode()
    ),
)
content_types = st.sampled_from(
    ["application/x-www-form-urlencoded", None, "application/json", "multipart/form-data; boundary=x", "text/plain"]
)


def check(service: TokenService, caller_name: str, sent: bytes, response: httpx.Response) -> None:
    """Never a 5xx; a refusal is an RFC 6749 error document; a grant is one the token policy allows for the form
    that was `sent` (its fields as any form reader sees them: each named once, or not at all)."""
    note(f"{caller_name}: {response.status_code} {response.text[:300]}")
    event(f"{response.status_code} {response.json().get('error') or response.json().get('title')}")
    assert response.status_code < 500, f"POST /token answered {response.status_code}: {response.text[:500]}"
    body = response.json()
    if response.status_code != 200:
        assert response.status_code in (400, 401, 403, 413), response.status_code
        return
    fields = parse_qs(sent.decode("utf-8", errors="replace"), keep_blank_values=True)
    form = {name: values[0] for name, values in fields.items() if len(values) == 1}
    caller, policy, holder = service.callers[caller_name], service.policy, caller_name
    token = verify(body["access_token"], service.keys, issuer=service.issuer, audience=form.get("audience", ""))
    check_holder(token, caller)  # bound to this caller's certificate, held by it
    assert token.audience in policy.may_call.get(holder, frozenset()), f"{holder} got a token for {token.audience}"
    assert token.subject in policy.users and token.scopes <= policy.users[token.subject]
    assert body["scope"] == " ".join(sorted(token.scopes))
    if form.get("grant_type") == USER_GRANT:
        assert holder in policy.edges, f"{holder} is no edge, yet got a token in {token.subject}'s name"
        assert token.subject == form.get("user")
    else:
        assert form.get("grant_type") == EXCHANGE_GRANT, f"a token for the grant {form.get('grant_type')!r}"
        given = service.given.get(form.get("subject_token", ""))
        assert given is not None, "an exchange granted for a subject token the service never issued"
        assert given.audience == holder and given.subject == token.subject, f"{holder} exchanged {given}"
        assert token.scopes <= given.scopes and token.expires_at <= given.expires_at, "an exchange widened the token"


@examples(100)
@given(st.data(), st.sampled_from(CALLERS), st.one_of(st.just("application/x-www-form-urlencoded"), content_types))
def test_post_token_never_fails_and_grants_only_what_the_policy_allows(
    token_service: TokenService, data: st.DataObject, caller: str, content_type: str | None
) -> None:
    body = data.draw(forms(token_service, caller), label="body")
    check(token_service, caller, body, token_service.post(caller, body, content_type))


@examples(30)
@given(raw_bodies, st.sampled_from(CALLERS))
@example(b"grant_type=%FF%FE&audience=service-a", "client")
def test_post_token_bytes_that_are_no_form_are_refused(token_service: TokenService, body: bytes, caller: str) -> None:
    check(token_service, caller, body, token_service.post(caller, body, "application/x-www-form-urlencoded"))


def test_the_fuzzed_token_service_grants_at_all(token_service: TokenService) -> None:
    """The properties above would hold vacuously if nothing were ever granted: the fixture's chain was."""
    assert {t.audience for t in token_service.given.values()} == {"service-a", "service-b", "service-c"}
    with pytest.raises(TokenRefused):
        check_holder(next(iter(token_service.given.values())), token_service.callers["operator"])
