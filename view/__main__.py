"""`python -m view` (`make view`): a live page of the mesh — who calls whom, who was refused and why, and when
each certificate runs out — at http://127.0.0.1:<port>/?token=… (loopback only; see view/server.py).

The view reads the services as the operator (pki/out/operator.crt, the identity allow/metrics.txt names):
every second GET /decisions on each (shared.decisions), every five seconds their certificates and trust.
It finds them where `make run` and `make up` put them (PORTS, default 8443,8444,8445,8446: A, B, C and the
token service), or at the URLs given:

    python -m view                                    # the local or Docker mesh on the default ports
    python -m view --ports 9443,9444,9445,9446
    python -m view service-a=https://127.0.0.1:9443 service-b=https://127.0.0.1:9444
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from pki.policy import Policy
from services.local import CHAIN, DEFAULT_PORTS
from shared import tls
from shared.files import MaterialError
from shared.layout import DEFAULT_OUT, Layout
from shared.tokens import TOKEN_SERVICE
from view.server import ViewServer
from view.watch import Watch

OPERATOR = "operator"


class SniClient(httpx.Client):
    """An httpx.Client that asks each service for the TLS server name of its own name (its certificate's DNS
    SAN): the Docker mesh's certificates name no 127.0.0.1, and a name check is what tells services apart."""

    def __init__(self, names: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = names  # base URL -> service name

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        if base in self.names:
            request.extensions["sni_hostname"] = self.names[base]
        return super().send(request, **kwargs)


def healthz_nodes(client: httpx.Client, services: dict[str, str], policy: Policy) -> dict[str, dict[str, Any]]:
    """Per service: its certificate and trust anchors (GET /healthz), and the authorization mode of the policy."""
    nodes: dict[str, dict[str, Any]] = {}
    for name, url in services.items():
        node: dict[str, Any] = {"spiffe_id": policy.spiffe_id(name), "mode": policy.authorize_by}
        try:
            health = client.get(f"{url}/healthz").json()
            node |= {"trust_anchors": health["trust_anchors"], **(health.get("certificate") or {})}
        except (httpx.HTTPError, ValueError, KeyError) as e:
            node["error"] = f"unreachable: {e}"
        nodes[name] = node
    return nodes


def parse_services(urls: list[str], ports: str) -> dict[str, str]:
    if urls:
        services = {}
        for given in urls:
            name, sep, url = given.partition("=")
            if not sep or not url.startswith("https://"):
                raise SystemExit(
                    f"view: {given!r} is not NAME=https://HOST:PORT (e.g. service-a=https://127.0.0.1:8443)"
                )
            services[name] = url.rstrip("/")
        return services
    numbers = [p.strip() for p in ports.split(",")]
    if len(numbers) != 4 or not all(p.isdigit() for p in numbers):
        raise SystemExit(
            f"view: --ports {ports!r}: give four port numbers, A,B,C,token service (e.g. 8443,8444,8445,8446)"
        )
    return {name: f"https://127.0.0.1:{p}" for name, p in zip((*CHAIN, TOKEN_SERVICE), numbers, strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m view", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("urls", nargs="*", metavar="NAME=URL", help="the services, instead of --ports")
    default_ports = os.environ.get("PORTS") or ",".join(map(str, DEFAULT_PORTS))
    parser.add_argument("--ports", default=default_ports, help=f"A,B,C,token service on 127.0.0.1 ({default_ports})")
    parser.add_argument("--port", type=int, default=0, help="the page's port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--pki-dir", type=Path, default=DEFAULT_OUT, help="where operator.crt is (default: pki/out)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads of the services (≤ 2)")
    args = parser.parse_args(argv)
    if not 0.2 <= args.interval <= 2:
        parser.error("--interval: between 0.2 and 2 seconds")

    services = parse_services(args.urls, args.ports)
    policy = Policy.load()
    try:
        context = tls.client_context(Layout(args.pki_dir).material(OPERATOR))
    except MaterialError as e:
        print(f"view: {e} (the view reads the services as the operator: run `make pki`)", file=sys.stderr)
        return 2
    names = {url: name for name, url in services.items()}
    client = SniClient(names, verify=context, timeout=3)
    watch = Watch(services, client, policy, lambda: healthz_nodes(client, services, policy), args.interval)
    with ViewServer(watch.state, args.port) as server:
        print(f"The mesh, live: {server.url}", flush=True)
        print("(loopback only; the token in the URL is the key — Ctrl-C stops the view)", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: watch.stop())
        thread = threading.Thread(target=watch.run, daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.5)
        except KeyboardInterrupt:
            watch.stop()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
