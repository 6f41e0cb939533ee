"""The service: one FastAPI app, three configurations. A, B and C differ only in their `ServiceConfig`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request

from services.config import ServiceConfig
from shared import tls
from shared.asgi_tls import CIPHER_NAMES, TLS_VERSION_NAMES
from shared.authz import AllowList, Guard, authorize_all, authorize_client_leaf, authorize_listed
from shared.downstream import Downstream
from shared.identity import CallerIdentity
from shared.problem import Problem, problem_response


def create_app(config: ServiceConfig) -> FastAPI:
    """Build the app, failing fast (before anything listens) if the allow-list or TLS material is bad."""
    allow_list = AllowList.load(config.allow_list)  # type: ignore[arg-type]
    guard = Guard(config.name, authorize_all(authorize_client_leaf(), authorize_listed(allow_list)))
    Caller = Annotated[CallerIdentity, Depends(guard)]
    outgoing = tls.client_context(config.tls) if config.downstream_url else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if outgoing is None:
            app.state.downstream = None
            yield
            return
        downstream = Downstream(
            config.name,
            config.downstream_name,
            config.downstream_url,
            outgoing,
            config.downstream_timeout,  # type: ignore[arg-type]
        )
        app.state.downstream = downstream
        yield
        await downstream.aclose()

    # No /docs or /openapi.json: every route is either guarded or deliberately open, nothing in between.
    app = FastAPI(title=config.name, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(Problem, problem_response)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """For health checks: any caller whose certificate passed TLS verification; no allow-list."""
        return {"status": "ok", "service": config.name}

    mesh = APIRouter(dependencies=[Depends(guard)])  # every route here is allow-listed

    @mesh.get("/chain")
    async def chain(request: Request, caller: Caller) -> dict[str, Any]:
        """This hop — who called us, over what — followed by the hops of everyone downstream."""
        hop = {"service": config.name, "caller": caller.summary(), "tls": tls_summary(request)}
        downstream: Downstream | None = request.app.state.downstream
        rest = (await downstream.get_json("/chain"))["hops"] if downstream else []
        return {"hops": [hop, *rest]}

    app.include_router(mesh)
    return app


def tls_summary(request: Request) -> dict[str, str]:
    extension = (request.scope.get("extensions") or {}).get("tls") or {}
    return {
        "version": TLS_VERSION_NAMES.get(extension.get("tls_version", 0), "unknown"),
        "cipher": CIPHER_NAMES.get(extension.get("cipher_suite", 0), "unknown"),
    }
