"""What the page shows, kept up to date: the graph from the policy, and per edge what was allowed and refused.

A `Watch` reads every service's recent decisions (GET /decisions, shared.observability.decisions) as the
operator, once a second, and turns them into per-edge counts since the view started; every few seconds it
reads what each service holds with the status collector (cockpit.collect, the one `make status` uses) for the nodes.

Who the edge's caller is comes from the decision: the verified caller's SPIFFE ID, mapped back to the
policy's name. A refused handshake names nobody we could believe, so it is counted on the edge from
"unverified" to the service that refused it.
Callers the policy does not connect to a service (the client straight at C) get an edge of their own,
drawn dashed: the refusal is the point.

A request passes the allow-list before its user token is checked (services/app.py: the guard, then
on_behalf), so the requests that got through an edge are its allow-list admissions minus its token refusals.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from cockpit.collect import MeshStatus
from pki.policy import Policy

__all__ = ["UNVERIFIED", "Edge", "Watch"]

UNVERIFIED = "unverified"  # the caller of a refused handshake: its certificate proved nothing
FEED = 50


@dataclass
class Edge:
    caller: str
    callee: str
    in_policy: bool
    admitted: int = 0  # by the allow-list
    refused: dict[str, int] = field(default_factory=dict)  # "layer/code" -> count
    reasons: dict[str, str] = field(default_factory=dict)  # "layer/code" -> the latest sentence
    last_refused: float = 0.0

    def as_dict(self, now: float, red_seconds: float) -> dict[str, Any]:
        token_refusals = sum(n for key, n in self.refused.items() if key.startswith("token/"))
        return {
            "caller": self.caller,
            "callee": self.callee,
            "in_policy": self.in_policy,
            "allowed": self.admitted - token_refusals,
            "refused": dict(sorted(self.refused.items())),
            "reasons": self.reasons,
            "red": now - self.last_refused < red_seconds,
        }


class Watch:
    """The mesh as the page shows it. `poll()` reads once; `run()` polls every `interval` until `stop()`.

    `clients`: service name -> an httpx.Client with the service's base URL, presenting the operator's certificate
    and checking the service's. `collect`: reads the mesh's status (cockpit.collect.collect, targets bound).
    """

    def __init__(
        self,
        clients: dict[str, httpx.Client],
        policy: Policy,
        collect: Callable[[], MeshStatus],
        interval: float = 1.0,
        nodes_every: float = 5.0,
        red_seconds: float = 5.0,
    ) -> None:
        self.clients, self.policy, self.collect = clients, policy, collect
        self.interval, self.nodes_every, self.red_seconds = interval, nodes_every, red_seconds
        services = list(clients)
        self.started = time.time()
        self.edges: dict[tuple[str, str], Edge] = {}
        for callee, callers in policy.allow.items():
            for caller in callers:
                self.edges[(caller, callee)] = Edge(caller, callee, True)
        self.feed: deque[dict[str, Any]] = deque(maxlen=FEED)
        self.after: dict[str, int | None] = dict.fromkeys(services)  # None: not read yet (the baseline)
        self.errors: dict[str, str] = {}
        self.missed: dict[str, int] = dict.fromkeys(services, 0)  # decisions the ring dropped between two reads
        self.nodes: dict[str, dict[str, Any]] = {}
        self.requests = 0  # made to the services, for the cost measurement
        self._nodes_read = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def name_of(self, spiffe_id: str | None) -> str:
        """A caller's name in the policy ("client"), from its SPIFFE ID; anything else as it came."""
        if spiffe_id is None:
            return UNVERIFIED
        prefix = f"spiffe://{self.policy.trust_domain}/"
        return spiffe_id.removeprefix(prefix) if spiffe_id.startswith(prefix) else spiffe_id

    def poll(self) -> None:
        for service, client in self.clients.items():
            self._read(service, client)
        if time.monotonic() - self._nodes_read >= self.nodes_every:
            self._nodes_read = time.monotonic()
            nodes = nodes_of(self.collect())
            self.requests += len(self.clients)
            with self._lock:
                self.nodes = nodes

    def _read(self, service: str, client: httpx.Client) -> None:
        after = self.after[service]
        self.requests += 1
        try:
            response = client.get("/decisions", params={"after": after or 0}, extensions={"sni_hostname": service})
            if response.status_code != 200:
                raise ValueError(f"answered {response.status_code} (is the operator on allow/metrics.txt?)")
            answer = response.json()
        except (httpx.HTTPError, ValueError) as e:
            with self._lock:
                self.errors[service] = f"GET {client.base_url}decisions: {e}"
            return
        with self._lock:
            self.errors.pop(service, None)
            if after is None:  # the first read: what happened before the view started is not counted
                self.after[service] = answer["last"]
                return
            decisions = answer["decisions"]
            if decisions and decisions[0]["seq"] > after + 1:
                self.missed[service] += decisions[0]["seq"] - after - 1
            for decision in decisions:
                self._count(service, decision)
            self.after[service] = answer["last"]

    def _count(self, service: str, decision: dict[str, Any]) -> None:
        caller = self.name_of(decision["caller"])
        edge = self.edges.get((caller, service))
        if edge is None:
            edge = self.edges[(caller, service)] = Edge(caller, service, False)
        key = f"{decision['layer']}/{decision['code']}"
        if decision["verdict"] == "allow":
            if decision["layer"] == "allow-list":
                edge.admitted += 1
        else:
            edge.refused[key] = edge.refused.get(key, 0) + 1
            edge.reasons[key] = decision["reason"]
            edge.last_refused = time.time()
        self.feed.appendleft({**decision, "service": service, "caller": caller, "peer": decision.get("peer")})

    def state(self) -> dict[str, Any]:
        """Everything the page draws, as JSON."""
        now = time.time()
        with self._lock:
            return {
                "now": now,
                "started": self.started,
                "ready": all(after is not None for after in self.after.values()),
                "nodes": self.nodes,
                "edges": [edge.as_dict(now, self.red_seconds) for edge in self.edges.values()],
                "feed": sorted(self.feed, key=lambda d: d["time"], reverse=True),  # read service by service
                "errors": self.errors,
                "missed": {k: v for k, v in self.missed.items() if v},
                "requests": self.requests,
            }

    def run(self) -> None:  # the view's one thread that reads the services
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()


def nodes_of(mesh: MeshStatus) -> dict[str, dict[str, Any]]:
    """Per service, what its node shows: certificate, countdowns, trust anchors, the allow-list mode in force."""
    nodes: dict[str, dict[str, Any]] = {}
    for service in mesh.services:
        name = service.target.name
        own = service.certificate
        allow = service.allow_lists.get(f"{name}.txt")
        nodes[name] = {
            "error": service.error,
            "spiffe_id": own.spiffe_id if own else None,
            "serial": own.serial if own else None,
            "not_after": f"{own.not_after:%Y-%m-%dT%H:%M:%SZ}" if own else None,
            "renew_at": f"{own.renewal_due:%Y-%m-%dT%H:%M:%SZ}" if own else None,
            "trust_anchors": list(service.trust_anchors),
            "mode": allow.mode if allow else None,
        }
    return nodes
