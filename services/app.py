"""The service: one FastAPI app, three configurations. A, B and C differ only in their `ServiceConfig`."""

import asyncio
import datetime as dt
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.config import ServiceConfig
from services.reloader import Reloader
from shared import tls, trace
from shared.allowlist import AllowList
from shared.authz import Authorizer, authorize_all, authorize_client_leaf, authorize_listed
from shared.certs import load_certificates
from shared.downstream import Downstream
from shared.files import MaterialError
from shared.guard import Guard
from shared.identity import CallerIdentity
from shared.limits import DeclaredBodyLimit
from shared.metrics import Gauge, exposition
from shared.peer import VerifiedPeer
from shared.problem import Problem, http_error_response, problem_response, unexpected_error_response
from shared.reload import Watcher
from shared.spiffe import InvalidSpiffeId, SpiffeId
from shared.trace import TraceMiddleware

# The decision codes of shared.authz, as the hop table says them.
ADMITTED_BY = {"listed": "thumbprint", "listed_spiffe_id": "spiffe-id"}


def service_policy(allow_list: AllowList) -> Authorizer:
    """Who may call a service: a leaf certificate for client use whose thumbprint is on its allow-list."""
    return authorize_all(authorize_client_leaf(), authorize_listed(allow_list))


def downstream_id(config: ServiceConfig) -> SpiffeId:
    """The SPIFFE ID the next hop must present: MESH_DOWNSTREAM_ID, or our own trust domain + its name."""
    if config.downstream_id:
        try:
            return SpiffeId.parse(config.downstream_id)
        except InvalidSpiffeId as e:
            raise MaterialError(f"MESH_DOWNSTREAM_ID={config.downstream_id!r} is not a SPIFFE ID: {e}") from None
    own = CallerIdentity.from_certificate(load_certificates(config.files.cert)[0])
    if own.spiffe_id is None:
        raise MaterialError(
            f"{config.files.cert}: no SPIFFE ID to take the trust domain from ({own.svid_problem}) — "
            "set MESH_DOWNSTREAM_ID to the SPIFFE ID the next hop must present"
        )
    return SpiffeId(SpiffeId.parse(own.spiffe_id).trust_domain, f"/{config.downstream_name}")


def create_app(config: ServiceConfig, live: tls.LiveTLS) -> FastAPI:
    """Build the app, failing fast (before anything listens) if an allow-list is bad.

    `live` holds the TLS contexts, already checked: the server's (given to uvicorn) and the outgoing one.
    """
    files = config.files
    guard = Guard(config.name, service_policy(AllowList.load(files.allow_list)))
    metrics_guard = Guard(config.name, service_policy(AllowList.load(files.metrics_allow_list)), "metrics")
    Caller = Annotated[CallerIdentity, Depends(guard)]
    # An expired CRL makes every handshake fail: alert well before, and re-sign it (`make pki`, from cron).
    Gauge(
        "mesh_crl_next_update_seconds",
        "Seconds until the CRL in force expires (every peer is refused after that): re-sign it with `make pki`",
        lambda: min(
            (
                (crl.next_update_utc - dt.datetime.now(dt.UTC)).total_seconds()
                for crl in live.crls
                if crl.next_update_utc
            ),
            default=None,
        ),
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

    expected_callee = downstream_id(config) if config.downstream_name else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        downstream = None
        if config.downstream_url and config.downstream_name and live.client is not None:
            downstream = Downstream(
                config.name,
                config.downstream_name,
                config.downstream_url,
                live.client,
                config.downstream_timeout,
                config.downstream_keepalive,
                expected_callee,
            )
        app.state.downstream = downstream
        guards = {files.allow_list: guard, files.metrics_allow_list: metrics_guard}
        reloader = Reloader(live, guards, service_policy, downstream)
        watcher = Watcher([*live.material.files(), *guards], reloader, config.reload_interval)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, watcher.trigger)
        watching = asyncio.create_task(watcher.run())
        yield
        watching.cancel()
        loop.remove_signal_handler(signal.SIGHUP)
        if downstream is not None:
            await downstream.aclose()

    # No /docs or /openapi.json: every route is either guarded or deliberately open, nothing in between.
    app = FastAPI(title=config.name, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(Problem, problem_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)
    app.add_exception_handler(Exception, unexpected_error_response)
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

    mesh = APIRouter(dependencies=[Depends(guard)])  # every route here is allow-listed

    @mesh.get("/chain")
    async def chain(request: Request, caller: Caller) -> dict[str, Any]:
        """This hop — who called us, over what — followed by the hops of everyone downstream."""
        span = trace.current.get()
        peer = VerifiedPeer.of(request.scope)
        hop = {
            "service": config.name,
            "caller": caller.summary(),
            "admitted_by": ADMITTED_BY.get(request.state.admitted_by, request.state.admitted_by),
            "tls": {"version": peer.tls_version, "cipher": peer.cipher},
            "trace_id": span.trace_id if span else None,
        }
        downstream: Downstream | None = request.app.state.downstream
        rest = (await downstream.get_json("/chain"))["hops"] if downstream else []
        return {"hops": [hop, *rest]}

    @app.get("/metrics", dependencies=[Depends(metrics_guard)])
    async def metrics() -> PlainTextResponse:
        """Prometheus text: decisions and TLS refusals. Only for the identities in allow/metrics.txt."""
        return PlainTextResponse(exposition(service=config.name), media_type="text/plain; version=0.0.4")

    app.include_router(mesh)
    return app
