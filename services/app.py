"""The service: one FastAPI app, three configurations. A, B and C differ only in their `ServiceConfig`.

The parts are built in services.wiring; here they get their routes. `base_app` is what every service of the
mesh shares with the token service (services/token_service.py).
"""

import asyncio
import datetime as dt
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse

from services.config import ServiceConfig
from services.reloader import Reloader, TrustClock
from services.status import service_status
from services.wiring import Service, build
from shared import tls
from shared.authz import Admitted
from shared.inbound import DeclaredBodyLimit, VerifiedPeer
from shared.observability import Gauge, TraceMiddleware, exposition, recent, trace
from shared.problem import EXCEPTION_HANDLERS
from shared.reload import Watcher
from shared.tokens import UserToken


def create_app(config: ServiceConfig, live: tls.LiveTLS) -> FastAPI:
    """The app of service A, B or C, failing fast (before anything listens) if an allow-list or identity is bad.

    `live` holds the TLS contexts, already checked: the server's (given to uvicorn) and the outgoing one.
    """
    return mesh_app(build(config, live))


def mesh_app(service: Service) -> FastAPI:
    """The routes of a service of the chain, over the parts `build` made."""
    config, guard, on_behalf = service.config, service.guard, service.on_behalf
    Caller = Annotated[Admitted, Depends(guard)]
    User = Annotated[UserToken | None, Depends(on_behalf)]
    app = base_app(service)
    # Every route here is allow-listed, then has its user token checked (required or not, a token sent is checked).
    mesh = APIRouter(dependencies=[Depends(guard), Depends(on_behalf)])

    @mesh.get("/chain")
    async def chain(request: Request, admitted: Caller, user: User) -> dict[str, Any]:
        """This hop — who called us, over what, on whose behalf — followed by the hops of everyone downstream."""
        span = trace.current.get()
        peer = VerifiedPeer.of(request.scope)
        hop = {
            "service": config.name,
            "caller": admitted.caller.summary(),
            "admitted_by": admitted.by,
            "tls": {"version": peer.tls_version, "cipher": peer.cipher},
            "on_behalf_of": user.summary() if user else None,
            "trace_id": span.trace_id if span else None,
        }
        downstream = service.downstream
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


def base_app(service: Service) -> FastAPI:
    """What every service of the mesh has, the token service included: error documents, trace ids, a body
    limit, /healthz, /metrics and /status for the identities of allow/metrics.txt, the gauges, and the live reload
    of its TLS material and of every file in `service.reloads`. The connections it makes are closed at the end."""
    config, live = service.config, service.live
    clock = TrustClock(live)
    _gauges(live, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reloader = Reloader(live, service.reloads, service.callees)
        watcher = Watcher([*live.material.files(), *service.reloads], reloader, config.reload_interval)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, watcher.trigger)
        watching = asyncio.create_task(watcher.run())
        checking = asyncio.create_task(clock.watch(config.reload_interval))
        yield
        watching.cancel()
        checking.cancel()
        reloader.close()
        loop.remove_signal_handler(signal.SIGHUP)
        for callee in service.callees:
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
            "issuers": sorted(crl.issuer for crl in live.crls),  # the CAs whose leaves count
            "certificate": {
                "serial": f"{own.serial_number:x}",
                "issuer": own.issuer.rfc4514_string(),
                "not_after": f"{own.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            }
            if own is not None
            else None,
        }

    @app.get("/metrics", dependencies=[Depends(service.metrics_guard)])
    async def metrics() -> PlainTextResponse:
        """Prometheus text: decisions and TLS refusals. Only for the identities in allow/metrics.txt."""
        return PlainTextResponse(exposition(service=config.name), media_type="text/plain; version=0.0.4")

    @app.get("/status", dependencies=[Depends(service.metrics_guard)])
    async def operator_status() -> dict[str, Any]:
        """What this service holds now (services/status.py). Only for the identities in allow/metrics.txt."""
        return service_status(config.name, live, service.allow_lists, service.status)

    @app.get("/decisions", dependencies=[Depends(service.metrics_guard)])
    async def decisions(after: int = 0) -> dict[str, Any]:
        """The latest decisions numbered above `after` (shared.observability.decisions), for the identities of
        allow/metrics.txt only."""
        entries, last = recent.since(after)
        return {"service": config.name, "kept": recent.size, "last": last, "decisions": [d.as_dict() for d in entries]}

    return app


def _gauges(live: tls.LiveTLS, clock: TrustClock) -> None:
    # An expired CRL makes every handshake with its CA's leaves fail: alert well before (services.reloader).
    Gauge(
        "mesh_crl_next_update_seconds",
        "Seconds until each CRL in force expires (every peer of its CA is refused after that); the renewer "
        "re-signs it at half its life",
        clock.seconds_left,
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
        "mesh_trust_generation", "How many times this service has (re)loaded its TLS material", lambda: live.generation
    )
