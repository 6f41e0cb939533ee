"""`python -m view` (`make view`): a live page of the mesh — who calls whom, who was refused and why, and when
each certificate runs out — at http://127.0.0.1:<port>/?token=… (loopback only; see view/server.py).

The view reads the services as the operator (pki/out/operator.crt, the identity allow/metrics.txt names):
every second GET /decisions on each (shared.observability.decisions), every five seconds their certificates and trust.
It finds them where `make run` and `make up` put them (PORTS, default 8443,8444,8445,8446: A, B, C and the
token service), or at the URLs given:

    python -m view                                    # the local or Docker mesh on the default ports
    python -m view --ports 9443,9444,9445,9446
    python -m view service-a=https://127.0.0.1:9443 service-b=https://127.0.0.1:9444
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
from pathlib import Path

import httpx

from cockpit.collect import OPERATOR, Target, collect, local_targets, parse_targets
from pki.authority import PKIError
from pki.policy import POLICY_FILE, Policy
from services.local import DEFAULT_PORTS, parse_ports
from shared import tls
from shared.authz import authorize_id
from shared.cli import add_version
from shared.layout import DEFAULT_OUT, Layout
from shared.outbound import callee_check, sync_transport
from shared.x509 import MaterialError, SpiffeId
from view.server import ViewServer
from view.watch import Watch


def targets_of(urls: list[str], ports: str) -> list[Target]:
    """The services named NAME=URL, or those of `make run` / `make up` on the ports A,B,C,token service."""
    if urls:
        return parse_targets(urls)
    try:
        return local_targets(parse_ports(ports))
    except ValueError as e:
        raise ValueError(f"--ports {e}") from None


def operator_clients(targets: list[Target], layout: Layout, policy: Policy) -> dict[str, httpx.Client]:
    """One client per service, kept open (a second's polls reuse the connection: no handshake each time),
    presenting the operator's certificate and checking that the service is who its name says."""
    # As the collector does: our own CRL must not stop us reading a service.
    context = tls.client_context(layout.material(OPERATOR, with_crl=False))
    return {
        t.name: httpx.Client(
            base_url=t.url,
            transport=sync_transport(context, callee_check(authorize_id(SpiffeId.parse(policy.spiffe_id(t.name))))),
            timeout=3,
        )
        for t in targets
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m view", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_version(parser)
    parser.add_argument("urls", nargs="*", metavar="NAME=URL", help="the services to watch, instead of --ports")
    default_ports = ",".join(map(str, DEFAULT_PORTS))
    parser.add_argument("--ports", default=default_ports, help=f"A,B,C,token service on 127.0.0.1 ({default_ports})")
    parser.add_argument("--port", type=int, default=0, help="the page's port on 127.0.0.1 (default: any free one)")
    parser.add_argument(
        "--pki-dir", type=Path, default=DEFAULT_OUT, help="where operator.crt is (default: $MESH_PKI_DIR, else pki/out)"
    )
    parser.add_argument("--policy", type=Path, default=POLICY_FILE, help="policy file (default: pki/policy.toml)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads of the services (≤ 2)")
    parser.add_argument("--red-seconds", type=float, default=5.0, help="how long an edge stays red after a refusal")
    args = parser.parse_args(argv)
    if not 0.2 <= args.interval <= 2:
        parser.error("--interval: between 0.2 and 2 seconds")
    try:
        targets = targets_of(args.urls, args.ports)
    except ValueError as e:
        parser.error(str(e))
    layout = Layout(args.pki_dir)
    try:
        policy = Policy.load(args.policy)
    except PKIError as e:
        print(f"view: {e}", file=sys.stderr)
        return 2
    try:
        clients = operator_clients(targets, layout, policy)
    except MaterialError as e:
        print(f"view: {e} (the view reads the services as the operator: run `make pki`)", file=sys.stderr)
        return 2
    # The view shows the services and what pki/out says they should hold, not `pki check`'s findings: no doctor.
    status = functools.partial(collect, targets, layout, args.policy, timeout=3, pki_check=False)
    watch = Watch(clients, policy, status, args.interval, red_seconds=args.red_seconds)
    with ViewServer(watch.state, args.port) as server:
        print(f"The mesh, live: {server.url}", flush=True)
        print("(loopback only; the token in the URL is the key — Ctrl-C stops the view)", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: watch.stop())
        thread = threading.Thread(target=watch.run, name="view-watch", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.5)
        except KeyboardInterrupt:
            watch.stop()
    for client in clients.values():
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
