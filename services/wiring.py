"""Where a service is built: from its configuration and TLS material to every part it runs with, in one place.

`build(config, live)` makes all of it before anything listens — the guards and the authorizers they apply, the
user-token check with its client, the connections to the next hop and to the token service — and nothing is
completed afterwards. What a changed file may replace is listed in one registry, `Service.reloads` (file → how
its new content is taken in, whole); the reloader (services.reloader) goes through nothing else.

The app (services.app) only routes requests to these parts; a test can build them with `connect=` an
httpx.MockTransport maker and drive the app in-process (tests/test_wiring.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.config import ServiceConfig
from services.reloader import Reload
from shared.authz import (
    AllowList,
    Authorizer,
    Authorizers,
    Guard,
    authorize_all,
    authorize_client_leaf,
    authorize_listed,
    authorize_trusted_now,
)
from shared.outbound import Connect, Downstream, nativetls
from shared.tls import LiveTLS
from shared.tokens import OnBehalfOf, TokenClient
from shared.x509 import InvalidSpiffeId, MaterialError, SpiffeId, peer_id

__all__ = ["Service", "build", "service_policy"]


def service_policy(allow_list: AllowList, live: LiveTLS) -> Authorizer:
    """Who may call a service: a leaf certificate for client use, trusted now, on the service's allow-list."""
    return authorize_all(authorize_client_leaf(), authorize_trusted_now(live.refusal), authorize_listed(allow_list))


@dataclass(frozen=True)
class Service:
    """Everything a running service is made of. Built by `build`, never changed; a reload swaps what a part
    holds (an authorizer, TLS contexts) through the registry, never the part itself."""

    config: ServiceConfig
    live: LiveTLS
    authorizers: Authorizers  # "api": the service's allow-list; "metrics": allow/metrics.txt
    guard: Guard  # the service's own routes
    metrics_guard: Guard  # /metrics
    on_behalf: OnBehalfOf  # the user token of every request
    downstream: Downstream | None  # the next hop, if any
    # Every connection the service makes: renewed with the TLS material, closed at the end.
    callees: tuple[Downstream, ...]
    reloads: dict[Path, Reload[Any]]  # the registry: every file besides the TLS material whose change is taken in
    # The allow-list each authorizer was made from, by file: what GET /status reports (services.status).
    allow_lists: dict[Path, AllowList]
    status: Callable[[], dict[str, Any]] | None = None  # what the service adds to GET /status of its own


def build(config: ServiceConfig, live: LiveTLS, *, connect: Connect = nativetls.transport) -> Service:
    """The service `config` describes, failing fast (before anything listens) on a bad allow-list or identity."""
    files = config.files
    allow_lists = {path: AllowList.load(path) for path in (files.allow_list, files.metrics_allow_list)}
    authorizers = Authorizers(
        api=service_policy(allow_lists[files.allow_list], live),
        metrics=service_policy(allow_lists[files.metrics_allow_list], live),
    )

    def allow_list(resource: str) -> Reload[AllowList]:
        def take(allow: AllowList) -> None:
            authorizers.replace(resource, service_policy(allow, live))
            allow_lists[allow.source] = allow

        return Reload(AllowList.load, take)

    def to(name: str, url: str, expected: SpiffeId, keepalive: bool = True) -> Downstream:
        if live.client is None:  # not under `python -O`'s skipped asserts: a service that calls on has one
            raise RuntimeError(f"{config.name} has no client context to call {name} with")
        timeout = config.downstream_timeout
        return Downstream(
            config.name,
            name,
            url,
            live.client,
            timeout,
            expected,
            keepalive=keepalive,
            recheck=live.recheck,
            connect=connect,
        )

    calls_on = live.client is not None  # services.__main__ builds outgoing contexts only for a service that calls on
    downstream = None
    if calls_on and config.downstream_url and config.downstream_name:
        downstream = to(
            config.downstream_name, config.downstream_url, _downstream_id(config, live), config.downstream_keepalive
        )
    tokens = None
    if calls_on and config.token_service_url:
        token_service_id = peer_id(live.certificate, files.cert, config.token_service_name)
        to_tokens = to(config.token_service_name, config.token_service_url, token_service_id)
        tokens = TokenClient(to_tokens, str(token_service_id), lambda: live.generation)
    return Service(
        config=config,
        live=live,
        authorizers=authorizers,
        guard=Guard(config.name, authorizers),
        metrics_guard=Guard(config.name, authorizers, "metrics"),
        on_behalf=OnBehalfOf(config.name, tokens, config.require_user_token),
        downstream=downstream,
        callees=tuple(c for c in (downstream, tokens.connection if tokens else None) if c is not None),
        reloads={files.allow_list: allow_list("api"), files.metrics_allow_list: allow_list("metrics")},
        allow_lists=allow_lists,
    )


def _downstream_id(config: ServiceConfig, live: LiveTLS) -> SpiffeId:
    """The SPIFFE ID the next hop must present: MESH_DOWNSTREAM_ID, or our own trust domain + its name."""
    if config.downstream_id:
        try:
            return SpiffeId.parse(config.downstream_id)
        except InvalidSpiffeId as e:
            raise MaterialError(f"MESH_DOWNSTREAM_ID={config.downstream_id!r} is not a SPIFFE ID: {e}") from None
    return peer_id(live.certificate, config.files.cert, str(config.downstream_name), "or set MESH_DOWNSTREAM_ID")
