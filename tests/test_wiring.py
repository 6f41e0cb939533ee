"""Every guard's rule, in-process: the real app and the real checks, with the network replaced by httpx's seams.

The caller's verified certificate goes where the handshake puts it (`shared.inbound.asgi.tls_extension` of a fake
SSLObject, handed to the app with `expose`), the requests go in through `httpx.ASGITransport`, and the next hop
and the token service answer through `httpx.MockTransport` — so each test shows the request refused *and* that
nothing went further. The callee check and the handshake's re-check get fake SSLObjects; `LiveTLS` gets a clock;
what closes connections that outlive their peer's trust gets stand-in connections.
The process-level tests (test_e2e, test_crl, test_security, …) prove the same rules over real TLS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import stat
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import FastAPI, Request
from joserfc.jwk import ECKey
from uvicorn.server import ServerState

from pki import Policy, init, replace_now, revoke, write_crl
from services.app import mesh_app
from services.config import ServiceConfig
from services.offload import LARGE, Offload
from services.reloader import Reload, Reloader, TrustClock, close_untrusted
from services.wiring import build
from shared.authz import AllowList, authorize_id
from shared.inbound import connections, expose, tls_extension, tls_protocol
from shared.layout import Layout
from shared.outbound import CalleeRefused, Downstream, callee_check, nativetls, refuse_unless
from shared.problem import Problem
from shared.tls import LiveTLS, read
from shared.tokens import OnBehalfOf, mint
from shared.x509 import MaterialError, PeerIdentity, SpiffeId, load_certificates, read_protected
from shared.x509 import files as x509_files
from tests.support import signing_key, wait_until

pytestmark = pytest.mark.fast

TOKEN_ISSUER = "spiffe://mesh.internal/token-service"


# ── the seams ───────────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class FakeSSLObject:
    """What a completed handshake hands over — the peer's certificate and the chain OpenSSL verified it with —
    without a handshake. `session_reused` with an empty chain is a resumed session: no chain to name its CA."""

    der: bytes | None
    chain: list[bytes] = field(default_factory=list)
    context: Any = None
    session_reused: bool = False
    closed: bool = False

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self.der

    def get_verified_chain(self) -> list[bytes]:
        return self.chain

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)

    def version(self) -> str:
        return "TLSv1.3"


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def peer(layout: Layout, name: str, *, context: Any = None, resumed: bool = False) -> FakeSSLObject:
    """`name`'s side of a connection, as OpenSSL verified it: leaf, intermediate, root (none when resumed)."""
    leaf, *intermediates = load_certificates(layout.cert(name))
    root = load_certificates(layout.ca_cert)[0]
    chain = [] if resumed else [der(leaf), *map(der, intermediates), der(root)]
    return FakeSSLObject(der(leaf), chain, context, session_reused=resumed)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("pki-template") / "out")
    init(layout, Policy.load())
    return layout


@pytest.fixture
def layout(template: Layout, tmp_path: Path) -> Layout:
    """A PKI of the test's own (a copy: revoking in one test must not revoke in the next)."""
    shutil.copytree(template.out, tmp_path / "out")
    return Layout(tmp_path / "out")


@dataclass
class Hops:
    """The next hop and the token service, answered in-process; what each was asked, in order."""

    key: ECKey = field(default_factory=signing_key)
    seen: list[httpx.Request] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if request.url.host == "token-service":
            if request.url.path == "/jwks":
                return answer({"keys": [self.key.as_dict(private=False)]})
            return answer({"access_token": "onward", "expires_in": 300})
        return answer({"hops": [{"service": "service-c"}]})

    def to(self, host: str) -> list[httpx.Request]:
        return [r for r in self.seen if r.url.host == host]


def answer(body: dict[str, Any]) -> httpx.Response:
    """A JSON answer as it comes from the network: a stream, read once."""
    return httpx.Response(200, stream=httpx.ByteStream(json.dumps(body).encode()))


@pytest.fixture
def hops() -> Hops:
    return Hops()


@asynccontextmanager
async def service_b(
    layout: Layout, hops: Hops, caller: FakeSSLObject | None, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, LiveTLS]]:
    """service-b as `python -m services` builds it (its app, its lifespan), called by `caller` over ASGI; with
    its TLS material in force, which a test may reload."""
    config = ServiceConfig(
        name="service-b",
        pki_dir=layout.out,
        downstream_url="https://service-c",
        downstream_name="service-c",
        token_service_url="https://token-service",
        reload_interval=3600,
        **settings,
    )
    live = LiveTLS(config.tls, require_client_cert=caller is not None, outgoing=True)
    # Every connection the service makes answered in-process: the transport's maker is the seam.
    app = mesh_app(build(config, live, connect=lambda context, limits, check: httpx.MockTransport(hops.handler)))
    extension = tls_extension(caller) if caller is not None else tls_extension(FakeSSLObject(None))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=expose(app, extension))
        async with httpx.AsyncClient(transport=transport, base_url="https://service-b") as client:
            yield client, live


def call(
    layout: Layout,
    hops: Hops,
    caller: FakeSSLObject | None,
    path: str = "/chain",
    token: str | None = None,
    authorization: str | None = None,
    **settings: Any,
) -> httpx.Response:
    """One request to service-b (built with `settings`) from `caller`, with `token` as its user token."""

    async def go() -> httpx.Response:
        async with service_b(layout, hops, caller, **settings) as (client, _):
            said = f"Bearer {token}" if token else authorization
            return await client.get(path, headers={"Authorization": said} if said else {})

    return asyncio.run(go())


def user_token(hops: Hops, layout: Layout, holder: str, scopes: str, audience: str = "service-b") -> str:
    identity = PeerIdentity.from_certificate(load_certificates(layout.cert(holder))[0])
    raw, _ = mint(
        hops.key,
        issuer=TOKEN_ISSUER,
        subject="alice",
        audience=audience,
        scopes=frozenset(scopes.split()),
        holder=identity,
        lifetime=300,
    )
    return raw


# ── the guard, the allow-list, the user token: through the real app ─────────────────────────────────────────


def test_a_listed_caller_gets_the_chain_and_the_next_hop_is_called_once(layout: Layout, hops: Hops) -> None:
    response = call(layout, hops, peer(layout, "service-a"))
    assert response.status_code == 200, response.text
    first, after = response.json()["hops"]
    assert (first["service"], first["admitted_by"], first["tls"]["version"]) == ("service-b", "thumbprint", "TLSv1.3")
    assert first["caller"]["spiffe_id"] == "spiffe://mesh.internal/service-a" and after == {"service": "service-c"}
    assert [r.url.path for r in hops.to("service-c")] == ["/chain"]


@pytest.mark.parametrize(
    ("caller", "status", "words"),
    [("client", 403, "not on the allow-list"), ("service-c", 403, "not on the allow-list"), (None, 401, "none was")],
    ids=["the client skipping a hop", "the callee calling back", "no certificate"],
)
def test_a_caller_not_allowed_is_refused_and_nothing_goes_further(
    layout: Layout, hops: Hops, caller: str | None, status: int, words: str
) -> None:
    response = call(layout, hops, peer(layout, caller) if caller else None)
    assert response.status_code == status and words in response.json()["detail"], response.text
    assert hops.seen == []


def test_a_caller_revoked_since_its_connection_opened_gets_no_further(layout: Layout, hops: Hops) -> None:
    """A request read on a connection just before a reload closed it (services.reloader): the guard holds it to
    the trust in force, not to the handshake's. The same caller, on the same connection, before and after."""

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with service_b(layout, hops, peer(layout, "service-a")) as (client, live):
            before = await client.get("/chain")
            revoke(layout, "service-a", "key-compromise")
            live.reload()
            return before, await client.get("/chain")

    before, after = asyncio.run(go())
    assert before.status_code == 200 and after.status_code == 403, after.text
    assert (
        after.json()["reason"]
        == "the certificate is no longer trusted since its connection opened: certificate revoked"
    )
    assert [r.url.path for r in hops.to("service-c")] == ["/chain"]  # the first request's call, and no other


def test_a_ca_certificate_is_no_caller(layout: Layout, hops: Hops) -> None:
    intermediate = load_certificates(layout.intermediate_cert)[0]
    root = load_certificates(layout.ca_cert)[0]
    response = call(layout, hops, FakeSSLObject(der(intermediate), [der(intermediate), der(root)]))
    assert response.status_code == 403 and "CA certificate" in response.json()["reason"], response.text
    assert hops.seen == []


def test_metrics_are_for_the_metrics_allow_list_only(layout: Layout, hops: Hops) -> None:
    response = call(layout, hops, peer(layout, "service-a"), "/metrics")
    assert response.status_code == 403 and "metrics.txt" in response.json()["reason"], response.text


def test_a_user_token_without_this_service_in_its_scope_is_refused(layout: Layout, hops: Hops) -> None:
    token = user_token(hops, layout, "service-a", "service-a service-c")
    response = call(layout, hops, peer(layout, "service-a"), token=token, require_user_token=True)
    assert response.status_code == 403, response.text
    assert response.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert "may not reach service-b" in response.json()["reason"]
    assert hops.to("service-c") == [] and [r.url.path for r in hops.to("token-service")] == ["/jwks"]


def test_a_user_token_bound_to_another_certificate_is_refused(layout: Layout, hops: Hops) -> None:
    token = user_token(hops, layout, "client", "service-a service-b service-c")  # the client's, sent by service-a
    response = call(layout, hops, peer(layout, "service-a"), token=token, require_user_token=True)
    assert response.status_code == 401 and "bound to another certificate" in response.json()["reason"], response.text
    assert hops.to("service-c") == []


def test_without_a_required_user_token_nothing_goes_further(layout: Layout, hops: Hops) -> None:
    response = call(layout, hops, peer(layout, "service-a"), require_user_token=True)
    assert response.status_code == 401 and "requires a user token" in response.json()["reason"], response.text
    assert hops.seen == []


def test_an_authorization_that_is_not_a_bearer_token_is_refused(layout: Layout, hops: Hops) -> None:
    response = call(layout, hops, peer(layout, "service-a"), token=None, authorization="Basic YWxpY2U6c2VjcmV0")
    assert response.status_code == 401 and "not `Bearer <token>`" in response.json()["reason"], response.text
    assert hops.seen == []


def test_a_user_token_without_a_certificate_to_bind_it_to_is_refused() -> None:
    """Behind the guard no request comes without a certificate; should one come, its token is still refused."""
    on_behalf = OnBehalfOf("service-b", object(), required=True)  # type: ignore[arg-type]
    scope = {"type": "http", "headers": [(b"authorization", b"Bearer x.y.z")], "extensions": {}}
    with pytest.raises(Problem) as refused:
        asyncio.run(on_behalf(Request(scope)))
    assert refused.value.status == 401 and "needs a client certificate" in refused.value.extra["reason"]


def test_a_user_token_in_scope_is_exchanged_for_the_next_hop(layout: Layout, hops: Hops) -> None:
    token = user_token(hops, layout, "service-a", "service-a service-b service-c")
    response = call(layout, hops, peer(layout, "service-a"), token=token, require_user_token=True)
    assert response.status_code == 200, response.text
    assert response.json()["hops"][0]["on_behalf_of"]["sub"] == "alice"
    [exchange] = [r for r in hops.to("token-service") if r.url.path == "/token"]
    assert b"audience=service-c" in exchange.content
    assert [r.headers["authorization"] for r in hops.to("service-c")] == ["Bearer onward"]


# ── the caller's check of its callee ────────────────────────────────────────────────────────────────────────


def to_service_b(live: LiveTLS) -> Downstream:
    return Downstream(
        "service-a",
        "service-b",
        "https://service-b",
        live.client,  # type: ignore[arg-type]
        5,
        SpiffeId("mesh.internal", "/service-b"),
        recheck=live.recheck,
    )


def test_the_callee_must_be_the_identity_we_meant_to_call(layout: Layout) -> None:
    live = LiveTLS(layout.material("service-a"))
    check = to_service_b(live).check
    check(peer(layout, "service-b"))  # type: ignore[arg-type]
    with pytest.raises(CalleeRefused, match=r"service-c is not spiffe://mesh\.internal/service-b"):
        check(peer(layout, "service-c"))  # type: ignore[arg-type]
    with pytest.raises(CalleeRefused, match="presented no certificate"):
        check(FakeSSLObject(None))  # type: ignore[arg-type]


def test_a_callee_revoked_while_the_handshake_was_in_flight_is_refused(layout: Layout) -> None:
    live = LiveTLS(layout.material("service-a"))
    check = to_service_b(live).check
    b = peer(layout, "service-b")
    revoke(layout, "service-b", "key-compromise")
    live.reload()
    with pytest.raises(CalleeRefused, match="certificate revoked"):
        check(b)  # type: ignore[arg-type]


def test_a_refused_callee_gets_its_connection_closed_and_no_request() -> None:
    closed: list[bool] = []
    check = callee_check(authorize_id(SpiffeId("mesh.internal", "/service-b")))
    with pytest.raises(httpcore.ConnectError, match="callee refused: the callee presented no certificate"):
        refuse_unless(check, FakeSSLObject(None), lambda: closed.append(True))  # type: ignore[arg-type]
    assert closed == [True]


# ── the server's re-check of a finished handshake ───────────────────────────────────────────────────────────


def protocol(live: LiveTLS) -> Any:
    """A connection's protocol as uvicorn makes it for the service (`tls_protocol`), before any connection:
    only its checks of a finished handshake are used."""
    factory = tls_protocol(lambda: live.server, ServiceConfig(name="service-b").limits, live.recheck)

    async def make() -> Any:
        config = uvicorn.Config(FastAPI(), http=factory, lifespan="off", log_config=None)
        config.load()
        return factory(config=config, server_state=ServerState(), app_state={})

    return asyncio.run(make())


def test_a_resumed_session_without_a_certificate_is_refused(layout: Layout) -> None:
    live = LiveTLS(layout.material("service-b"))
    resumed = FakeSSLObject(None, context=live.server, session_reused=True)
    assert protocol(live)._no_longer_good(resumed) == "resumed session without a certificate to check"


def test_a_session_resumed_from_before_new_contexts_is_refused(layout: Layout) -> None:
    """A resumed session shows no chain, so no CA: it passes only on the contexts it was made under. New ones (a CA
    added or removed, our own new certificate) refuse it. A CRL alone keeps them, and the revocations then apply to
    the session's certificate as to any peer's."""
    live = LiveTLS(layout.material("service-b"))
    before = live.server

    def resumed() -> str | None:
        return protocol(live)._no_longer_good(peer(layout, "service-a", context=before, resumed=True))  # type: ignore[no-any-return]

    assert resumed() is None
    revoke(layout, "service-a", "key-compromise")
    live.reload()
    assert live.server is before and resumed() == "certificate revoked"
    replace_now(layout, Policy.load(), "service-b")
    live.reload()
    assert live.server is not before and "trust that has changed" in (resumed() or "")


def test_a_caller_revoked_during_its_handshake_is_refused_when_it_completes(layout: Layout) -> None:
    live = LiveTLS(layout.material("service-b"))
    a = peer(layout, "service-a", context=live.server)
    assert protocol(live)._no_longer_good(a) is None
    revoke(layout, "service-a", "key-compromise")
    live.reload()
    assert protocol(live)._no_longer_good(a) == "certificate revoked"


# ── what LiveTLS holds a peer to ────────────────────────────────────────────────────────────────────────────


def test_a_peer_is_judged_by_the_clock_it_is_given(layout: Layout) -> None:
    a = PeerIdentity.from_certificate(load_certificates(layout.cert("service-a"))[0])
    now = [time.time()]
    live = LiveTLS(layout.material("service-b"), clock=lambda: now[0])
    assert live.refusal(a) is None
    now[0] = a.not_after.timestamp() + 1  # type: ignore[union-attr]
    assert live.refusal(a) == "certificate has expired"


def test_a_peer_of_a_root_or_an_issuer_no_longer_trusted_is_refused(layout: Layout) -> None:
    live = LiveTLS(layout.material("service-b"))
    sslobj = peer(layout, "service-a", context=live.server)
    sslobj.chain = [sslobj.chain[0], sslobj.chain[1], b"another root"]
    assert "root CA" in (live.recheck(sslobj) or "")  # type: ignore[arg-type]
    other = load_certificates(layout.ca_cert)[0]  # a leaf whose issuer is a CA with no CRL in force: the root
    sslobj = peer(layout, "service-a", context=live.server)
    sslobj.chain = [sslobj.chain[0], der(other)]
    assert "no CRL of it is in force" in (live.recheck(sslobj) or "")  # type: ignore[arg-type]


def test_an_older_crl_is_refused_even_with_the_same_revocations(layout: Layout) -> None:
    revoke(layout, "client", "key-compromise")
    live = LiveTLS(layout.material("service-b"))
    older = layout.crl.read_bytes()
    write_crl(layout)  # the same revocation, numbered higher
    live.reload()
    layout.crl.write_bytes(older)
    with pytest.raises(MaterialError, match=r"un-revoke certificates \(number \d+ with 1 entries; in force: number"):
        live.reload()
    layout.crl.write_bytes(b"")  # and a lost crl.pem un-revokes nobody either
    with pytest.raises(MaterialError, match="not a PEM CRL"):
        live.reload()
    assert sum(map(len, live.trust.revoked.values())) == 1


def test_a_read_checked_against_other_crls_than_those_in_force_is_refused(layout: Layout) -> None:
    """What `read` checked a new CRL against must be what is in force when it is swapped in: a read made before
    another reload (or with nothing in force) could otherwise un-revoke what that reload brought."""
    live = LiveTLS(layout.material("service-b"))
    stale = read(live.material, [])  # as if nothing were in force
    with pytest.raises(MaterialError, match="reloaded by someone else meanwhile"):
        live.prepare(stale)
    live.install(live.prepare(read(live.material, live.crls)))


def test_a_newer_crl_that_forgets_a_revocation_is_refused(layout: Layout) -> None:
    live = LiveTLS(layout.material("service-b"))
    revoke(layout, "client", "key-compromise")
    live.reload()
    record = json.loads(layout.revocations.read_text())
    layout.revocations.write_text(json.dumps({**record, "revoked": []}))
    write_crl(layout)  # signed by our CA, numbered higher, and empty
    with pytest.raises(MaterialError, match="drops the revoked serial"):
        live.reload()
    assert sum(map(len, live.trust.revoked.values())) == 1


def test_a_reload_that_fails_unexpectedly_is_refused_and_reloading_goes_on(
    layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only MaterialError: any error reading a file is a refused reload, logged, and never the end of the
    watcher that calls the reloader (an exception escaping it ended all reloading, silently)."""
    taken: list[str] = []

    def broken(path: Path) -> str:
        raise ValueError("not a file problem")

    path = layout.allow_list("service-a")
    reloader = Reloader(LiveTLS(layout.material("service-a")), {path: Reload(broken, taken.append)})
    try:
        asyncio.run(reloader({path}))
        [refused] = [r for r in caplog.records if r.getMessage() == "reload_refused"]
        assert not taken and refused.reason == "ValueError: not a file problem (a bug: please report it)"  # type: ignore[attr-defined]
        reloader.reloads = {path: Reload(str, taken.append)}
        asyncio.run(reloader({path}))
        assert taken == [str(path)]
    finally:
        reloader.close()


# ── what the trust clock closes ─────────────────────────────────────────────────────────────────────────────


@dataclass
class StandIn:
    """A transport, and the reader and writer of an outgoing stream around it: enough for what closes or retires
    a connection to act on, and for httpcore's question before reusing it (is_readable)."""

    aborted: bool = False

    @property
    def transport(self) -> StandIn:
        return self

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def at_eof(self) -> bool:
        return False


@dataclass
class Open:
    """Stand-in connections in this process's tables: callers' to us, and ours to callees."""

    peers: dict[str, PeerIdentity]  # everyone's, by name
    callers: dict[str, StandIn]  # the transport of each caller's connection to us
    callees: dict[str, nativetls.Stream]  # our connection to each callee
    callee_transports: dict[str, StandIn]


@contextmanager
def connected(layout: Layout, callers: Sequence[str], callees: Sequence[str]) -> Iterator[Open]:
    """Callers' connections to us, in the table as a completed handshake leaves them, and ours to callees, open as
    our outgoing handshake leaves them; all gone after."""
    peers = {
        name: PeerIdentity.from_certificate(load_certificates(layout.cert(name))[0]) for name in (*callers, *callees)
    }
    protocols = {name: asyncio.Protocol() for name in callers}
    inbound, outbound = {name: StandIn() for name in callers}, {name: StandIn() for name in callees}
    streams = {name: nativetls.Stream(outbound[name], outbound[name], check=lambda _: None) for name in callees}  # type: ignore[arg-type]
    assert not connections.established and not list(nativetls._open), "connections another test left open"
    try:
        for name in callers:
            connections.add(protocols[name], inbound[name], peers[name])
        for name, stream in streams.items():
            stream.callee = peers[name]
            nativetls._open.add(stream)
        yield Open(peers, inbound, streams, outbound)
    finally:
        for protocol in protocols.values():
            connections.remove(protocol)
        for stream in streams.values():
            nativetls._open.discard(stream)


def test_a_connection_outliving_its_peers_certificate_is_closed_or_retired(layout: Layout) -> None:
    """`close_untrusted`, which the trust clock runs each tick, closes a caller's connection and retires ours to a
    callee once the peer's certificate has expired: an expiry changes no file, so no reload would."""
    write_crl(layout, lifetime=dt.timedelta(days=365))  # outlives the certificates: only they expire here
    now = [time.time()]
    live = LiveTLS(layout.material("service-b"), clock=lambda: now[0])
    with connected(layout, callers=["service-a"], callees=["service-c"]) as open_:
        assert close_untrusted(live) == 0
        assert not open_.callers["service-a"].aborted and not open_.callees["service-c"].get_extra_info("is_readable")
        now[0] = max(peer.not_after for peer in open_.peers.values()).timestamp() + 1  # type: ignore[type-var, union-attr]
        assert {live.refusal(peer) for peer in open_.peers.values()} == {"certificate has expired"}
        assert close_untrusted(live) == 2
        assert open_.callers["service-a"].aborted  # cut: no more answers to a caller we no longer trust
        to_c = open_.callees["service-c"]
        assert to_c.retired and not open_.callee_transports["service-c"].aborted  # a call under way on it finishes…
        assert to_c.get_extra_info("is_readable")  # …and httpcore's pool drops it before the next


def test_a_revocation_closes_that_peers_connections_and_no_other(layout: Layout) -> None:
    live = LiveTLS(layout.material("service-b"))
    with connected(layout, callers=["service-a", "client"], callees=["service-c"]) as open_:
        revoke(layout, "service-a", "key-compromise")
        live.reload()
        assert close_untrusted(live) == 1
        assert open_.callers["service-a"].aborted
        assert not open_.callers["client"].aborted and not open_.callees["service-c"].retired


def test_after_a_ca_left_ca_crt_the_connections_on_resumed_sessions_are_closed(layout: Layout) -> None:
    """A resumed session's peer shows no chain (the stand-ins' peers have none either): no CA to check it against.
    The reloader passes `resumed_too` when a CA left ca.crt (test_trust_edges proves it on a real resumed session)."""
    live = LiveTLS(layout.material("service-b"))
    with connected(layout, callers=["service-a"], callees=[]) as open_:
        assert open_.peers["service-a"].anchor is None
        assert close_untrusted(live) == 0 and not open_.callers["service-a"].aborted
        assert close_untrusted(live, resumed_too=True) == 1 and open_.callers["service-a"].aborted


def test_a_failing_tick_of_the_trust_clock_is_said_and_the_clock_goes_on(
    layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    clock = TrustClock(LiveTLS(layout.material("service-b")))
    ticks: list[float] = []

    def check() -> None:
        ticks.append(time.monotonic())
        if len(ticks) == 1:
            raise ValueError("a bug")

    clock.check = check  # type: ignore[method-assign]

    async def two_ticks() -> None:
        watching = asyncio.create_task(clock.watch(interval=0))
        async with asyncio.timeout(5):
            while len(ticks) < 2 and not watching.done():
                await asyncio.sleep(0)
        if watching.done():  # the clock stopped: say why at once
            watching.result()
        watching.cancel()

    asyncio.run(two_ticks())
    [failed] = [r for r in caplog.records if r.getMessage() == "trust_clock_failed"]
    assert failed.reason == "ValueError: a bug (a bug: please report it)"  # type: ignore[attr-defined]


@dataclass
class Callee:
    """A Downstream as the reloader sees it: what it was renewed with."""

    renewed: list[Any] = field(default_factory=list)

    def renew(self, context: Any) -> None:
        self.renewed.append(context)


def test_a_crl_alone_keeps_the_contexts_and_the_pools_and_applies_at_once(layout: Layout) -> None:
    """The contexts carry no CRL: when it alone changes they stay (building them is most of a reload's pause of
    the event loop), and so do the pools to the callees. A new certificate builds new ones, and new pools."""
    live, callee = LiveTLS(layout.material("service-b")), Callee()
    reloader = Reloader(live, {}, [callee])  # type: ignore[list-item]
    server, client = live.server, live.client
    a = PeerIdentity.from_certificate(load_certificates(layout.cert("service-a"))[0])
    try:
        revoke(layout, "service-a", "key-compromise")
        asyncio.run(reloader({layout.crl}))
        assert live.refusal(a) == "certificate revoked"  # at once, for every handshake and request from now on
        assert live.server is server and live.client is client and callee.renewed == []
        replace_now(layout, Policy.load(), "service-b")
        asyncio.run(reloader({layout.cert("service-b")}))
        assert live.server is not server and live.client is not client and callee.renewed == [live.client]
    finally:
        reloader.close()


def die_in_a_child(parent: int) -> str:
    """Read in the child, it dies as a process killed mid-read would; read in `parent`, it survives."""
    if os.getpid() != parent:
        os._exit(1)
    return "read in the service's own process"


def test_a_large_file_is_read_in_a_child_process_and_a_refusal_comes_back_whole(tmp_path: Path) -> None:
    """A reload reads a small file on a worker thread and a large one in a child process (services.offload), whose
    MaterialError reaches the reloader with its sentence. A child that dies (mid-read or idle) or hangs is
    replaced, and the file read on the thread: reloading never stops (an idle child killed once ended it)."""
    broken = tmp_path / "allow.txt"
    broken.write_text("".join(f"{i:064x}  # filler {i}\n" for i in range(LARGE // 80)) + "not-a-thumbprint\n")
    offload = Offload(patience=2)

    def read(function: Any, *args: Any, size: int = LARGE) -> Any:
        return asyncio.run(offload(function, *args, size=size))

    try:
        assert read(os.getpid, size=LARGE - 1) == os.getpid()
        child = read(os.getpid)
        assert child != os.getpid() and read(os.getpid) == child  # started once, kept
        with pytest.raises(MaterialError, match=rf"allow.txt:{LARGE // 80 + 1}: .* fix or delete the line"):
            read(AllowList.load, broken, size=broken.stat().st_size)
        assert read(die_in_a_child, os.getpid()) == "read in the service's own process"  # died mid-read
        idle = read(os.getpid)
        os.kill(idle, signal.SIGKILL)
        # Until the pool knows (its private flag): the next read then fails at submit, not at await.
        wait_until(lambda: bool(getattr(offload._child, "_broken", False)))
        assert read(os.getpid) == os.getpid()  # died idle: this read on the thread, the next in a new child
        hung = read(os.getpid)
        assert hung not in (os.getpid(), child, idle)
        os.kill(hung, signal.SIGSTOP)
        assert read(os.getpid) == os.getpid()  # no answer within `patience`: killed, read on the thread
        assert read(os.getpid) not in (os.getpid(), hung)
    finally:
        offload.close()


# ── the file rules, for any user (no root needed: the owner is faked where it must be) ──────────────────────


@pytest.fixture
def trust_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_bytes(b"trust")
    path.chmod(0o644)
    return path


def owned_by(monkeypatch: pytest.MonkeyPatch, uid: int, gid: int | None = None) -> None:
    """The next files read look owned by `uid` (and group `gid`): what only root could arrange for real."""
    real = os.fstat

    def fstat(fd: int) -> os.stat_result:
        info = list(real(fd))
        info[stat.ST_UID] = uid
        info[stat.ST_GID] = info[stat.ST_GID] if gid is None else gid
        return os.stat_result(info)

    monkeypatch.setattr(x509_files.os, "fstat", fstat)


def test_a_trust_file_others_can_write_is_refused(trust_file: Path) -> None:
    assert read_protected(trust_file, "CA file") == b"trust"
    for mode in (0o664, 0o646):
        trust_file.chmod(mode)
        with pytest.raises(MaterialError, match=r"writable by other users .* run `chmod go-w"):
            read_protected(trust_file, "CA file")


def test_a_key_others_can_read_is_refused(trust_file: Path) -> None:
    with pytest.raises(MaterialError, match=r"accessible by other users \(mode 0644\) — run `chmod 600"):
        read_protected(trust_file, "private key", private=True)
    trust_file.chmod(0o600)
    assert read_protected(trust_file, "private key", private=True) == b"trust"


def test_a_file_of_another_user_is_refused(trust_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    owned_by(monkeypatch, os.geteuid() + 1)
    with pytest.raises(MaterialError, match=f"belongs to uid {os.geteuid() + 1}, who could change it"):
        read_protected(trust_file, "CA file")
    owned_by(monkeypatch, 0)  # root may own it
    assert read_protected(trust_file, "CA file") == b"trust"


@pytest.mark.parametrize(
    ("mode", "our_group", "allowed"),
    [(0o640, True, True), (0o440, True, True), (0o640, False, False), (0o660, True, False), (0o644, True, False)],
)
def test_a_root_owned_key_may_be_read_by_our_group_only(
    trust_file: Path, monkeypatch: pytest.MonkeyPatch, mode: int, our_group: bool, allowed: bool
) -> None:
    """PostgreSQL's rule, as Kubernetes mounts a Secret for a non-root pod (group fsGroup)."""
    trust_file.chmod(mode)
    groups = {os.getegid(), *os.getgroups()}
    owned_by(monkeypatch, 0, os.getegid() if our_group else max(groups) + 1)
    if allowed:
        assert read_protected(trust_file, "private key", private=True) == b"trust"
    else:
        with pytest.raises(MaterialError, match="by other users"):
            read_protected(trust_file, "private key", private=True)
