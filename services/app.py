"""The service: one FastAPI app, three configurations. A, B and C differ only in their `ServiceConfig`.

`base_app` is what every service of the mesh shares with the token service (services/token_service.py).
"""

import asyncio
import datetime as dt
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse

from services.config import ServiceConfig
from services.reloader import CrlFreshness, Reloader
from shared import tls
from shared.authz import AllowList, Authorizer, Guard, authorize_all, authorize_client_leaf, authorize_listed
from shared.inbound import DeclaredBodyLimit, VerifiedPeer
from shared.observability import Gauge, TraceMiddleware, exposition, trace
from shared.outbound import Downstream
from shared.problem import EXCEPTION_HANDLERS
from shared.reload import Watcher
from shared.tokens import OnBehalfOf, TokenClient, UserToken
from shared.x509 import InvalidSpiffeId, MaterialError, PeerIdentity, SpiffeId

# The decision codes of shared.authz.rules, as the hop table says them.
ADMITTED_BY = {"listed": "thumbprint", "listed_spiffe_id": "spiffe-id"}


def service_policy(allow_list: AllowList) -> Authorizer:
    """Who may call a service: a leaf certificate for client use whose thumbprint is on its allow-list."""
    return authorize_all(authorize_client_leaf(), authorize_listed(allow_list))


def downstream_id(config: ServiceConfig, live: tls.LiveTLS) -> SpiffeId:
    """The SPIFFE ID the next hop must present: MESH_DOWNSTREAM_ID, or our own trust domain + its name."""
    if config.downstream_id:
        try:
            return SpiffeId.parse(config.downstream_id)
        except InvalidSpiffeId as e:
            raise MaterialError(f"MESH_DOWNSTREAM_ID={config.downstream_id!r} is not a SPIFFE ID: {e}") from None
    return peer_id(config, live, str(config.downstream_name), "or set MESH_DOWNSTREAM_ID")


def peer_id(config: ServiceConfig, live: tls.LiveTLS, name: str, or_else: str = "") -> SpiffeId:
    """spiffe://<our own trust domain>/<name>: the SPIFFE ID a peer of ours called `name` presents."""
    return SpiffeId(own_id(config, live, f"the SPIFFE ID {name} must present", or_else).trust_domain, f"/{name}")


def own_id(config: ServiceConfig, live: tls.LiveTLS, needed_for: str, or_else: str = "") -> SpiffeId:
    """This service's SPIFFE ID, read from the certificate in force; MaterialError naming what needed it."""
    own = PeerIdentity.from_certificate(live.certificate) if live.certificate else None
    if own is None or own.spiffe_id is None:
        problem = own.svid_problem if own else "no certificate"
        raise MaterialError(
            f"{config.files.cert}: {needed_for} comes from this service's own SPIFFE ID, and its certificate has "
            f"none ({problem}) — issue it one with `make pki`{f', {or_else}' if or_else else ''}"
        )
    return SpiffeId.parse(own.spiffe_id)


def create_app(config: ServiceConfig, live: tls.LiveTLS) -> FastAPI:
    """Build the app, failing fast (before anything listens) if an allow-list is bad.

    `live` holds the TLS contexts, already checked: the server's (given to uvicorn) and the outgoing one.
    """
    files = config.files
    guard = Guard(config.name, service_policy(AllowList.load(files.allow_list)))
    Caller = Annotated[PeerIdentity, Depends(guard)]
    expected_callee = downstream_id(config, live) if config.downstream_name else None
    token_service_id = peer_id(config, live, config.token_service_name) if config.token_service_url else None
    on_behalf = OnBehalfOf(config.name, None, config.require_user_token)  # its TokenClient comes with the start
    User = Annotated[UserToken | None, Depends(on_behalf)]

    def start(app: FastAPI) -> list[Downstream]:
        """The connections this service makes, once its event loop runs: to the next hop, to the token service."""
        callees = []
        app.state.downstream = None
        if config.downstream_url and config.downstream_name and live.client is not None:
            app.state.downstream = Downstream(
                config.name,
                config.downstream_name,
                config.downstream_url,
                live.client,
                config.downstream_timeout,
                config.downstream_keepalive,
                expected_callee,
                recheck=live.recheck,
            )
            callees.append(app.state.downstream)
        if config.token_service_url and token_service_id and live.client is not None:
            to_tokens = Downstream(
                config.name,
                config.token_service_name,
                config.token_service_url,
                live.client,
                config.downstream_timeout,
                expected_id=token_service_id,
                recheck=live.recheck,
            )
            on_behalf.tokens = TokenClient(to_tokens, str(token_service_id), lambda: live.generation)
            callees.append(to_tokens)
        return callees

    app = base_app(config, live, {files.allow_list: guard}, start)
    # Every route here is allow-listed, then has its user token checked (required or not, a token sent is checked).
    mesh = APIRouter(dependencies=[Depends(guard), Depends(on_behalf)])

    @mesh.get("/chain")
    async def chain(request: Request, caller: Caller, user: User) -> dict[str, Any]:
        """This hop — who called us, over what, on whose behalf — followed by the hops of everyone downstream."""
        span = trace.current.get()
        peer = VerifiedPeer.of(request.scope)
        hop = {
            "service": config.name,
            "caller": caller.summary(),
            "admitted_by": ADMITTED_BY.get(request.state.admitted_by, request.state.admitted_by),
            "tls": {"version": peer.tls_version, "cipher": peer.cipher},
            "on_behalf_of": user.summary() if user else None,
            "trace_id": span.trace_id if span else None,
        }
        downstream: Downstream | None = request.app.state.downstream
        if downstream is None:
            return {"hops": [hop]}
        headers = {}
        if user is not None and on_behalf.tokens is not None:  # on behalf of the same user, held by us now
            headers["Authorization"] = f"Bearer {await on_behalf.tokens.exchange(user, downstream.name)}"
        answer = await downstream.get_json("/chain", headers)
        hops = answer.get("hops") if isinstance(answer, dict) else None
        if not isinstance(hops, list):
            raise downstream.failure(f"{downstream.name} answered without the hops of the chain behind it")
        return {"hops": [hop, *hops]}

    app.include_router(mesh)
    return app


def base_app(
    config: ServiceConfig,
    live: tls.LiveTLS,
    guards: dict[Path, Guard],
    start: Callable[[FastAPI], list[Downstream]],
    on_change: Callable[[set[Path]], None] | None = None,
    watch: tuple[Path, ...] = (),
) -> FastAPI:
    """What every service of the mesh has, the token service included: error documents, trace ids, a body
    limit, /healthz, /metrics for the identities of allow/metrics.txt, the gauges, and the live reload of its
    TLS material and of the allow-lists in `guards` (plus `watch`, handed to `on_change`).

    `start(app)` runs once the event loop does, and returns the connections the service makes (closed at the
    end, renewed when the TLS material changes).
    """
    metrics_guard = Guard(config.name, service_policy(AllowList.load(config.files.metrics_allow_list)), "metrics")
    guards = {**guards, config.files.metrics_allow_list: metrics_guard}
    freshness = CrlFreshness(live)
    _gauges(live, freshness)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        callees = start(app)
        reloader = Reloader(live, guards, service_policy, callees)

        def changed(paths: set[Path]) -> None:
            reloader(paths)
            if on_change is not None and paths & set(watch):
                on_change(paths & set(watch))

        watcher = Watcher([*live.material.files(), *guards, *watch], changed, config.reload_interval)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, watcher.trigger)
        watching = asyncio.create_task(watcher.run())
        checking = asyncio.create_task(freshness.watch(config.reload_interval))
        yield
        watching.cancel()
        checking.cancel()
        loop.remove_signal_handler(signal.SIGHUP)
        for callee in callees:
            await callee.aclose()

    # No /docs or /openapi.json: every route is either guarded or deliberately open, nothing in between.
    app = FastAPI(
        title=config.name,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.add_middleware(DeclaredBodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(TraceMiddleware)  # outermost: every log line of the request carries the trace id

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """For health checks and rollover gates: any caller whose certificate passed TLS verification.

        Says what is in force: the trust anchors (SHA-256) and this service's own certificate.
        """
        own = live.certificate
        return {
            "status": "ok",
            "service": config.name,
            "trust_anchors": live.anchors,
            "issuers": sorted(crl.issuer.rfc4514_string() for crl in live.crls),  # the CAs whose leaves count
            "certificate": {
                "serial": f"{own.serial_number:x}",
                "issuer": own.issuer.rfc4514_string(),
                "not_after": f"{own.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            }
            if own is not None
            else None,
        }

    @app.get("/metrics", dependencies=[Depends(metrics_guard)])
    async def metrics() -> PlainTextResponse:
        """Prometheus text: decisions and TLS refusals. Only for the identities in allow/metrics.txt."""
        return PlainTextResponse(exposition(service=config.name), media_type="text/plain; version=0.0.4")

    return app


def _gauges(live: tls.LiveTLS, freshness: CrlFreshness) -> None:
    # An expired CRL makes every handshake with its CA's leaves fail: alert well before (services.reloader).
    Gauge(
        "mesh_crl_next_update_seconds",
        "Seconds until each CRL in force expires (every peer of its CA is refused after that); the renewer "
        "re-signs it at half its life",
        freshness.seconds_left,
        label="issuer",
    )
    Gauge(
        "mesh_certificate_expiry_seconds",
        "Seconds until this service's own certificate expires (the renewer replaces it at half its life)",
        lambda: (
            (live.certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
            if live.certificate is not None
            else None
        ),
    )
    Gauge(
        "mesh_trust_generation", "How many times this service has (re)built its TLS contexts", lambda: live.generation
    )
