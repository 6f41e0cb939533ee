"""`make demo`: the whole story in one command — the chain working, then every kind of caller it refuses.

It creates the PKI if needed, starts A, B and C on 127.0.0.1, makes each call below, prints what the
client saw and the command to repeat it, and stops everything. Exit status 0 only if every call ended
the way the story says it must.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from client.__main__ import call, default_server_id
from pki import Policy, init, load_issuer, self_signed
from services.local import (
    CHAIN,
    DEFAULT_PORTS,
    ServiceProcess,
    busy_ports,
    chain_environments,
    free_ports,
    parse_ports,
    running,
)
from shared.authz import authorize_id
from shared.cli import add_version
from shared.layout import Layout
from shared.outbound import callee_check
from shared.tls import TLSMaterial


@dataclass
class Scene:
    title: str
    port: int
    server_name: str
    cert: Path | None
    key: Path | None
    expect: str  # "ok", or the start of the explanation we must see
    cli: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.demo", description=__doc__)
    add_version(parser)
    parser.add_argument(
        "--ports",
        default=",".join(map(str, DEFAULT_PORTS)),
        help="ports of A,B,C and the token service, as for `make run` (default: 8443,8444,8445,8446)",
    )
    args = parser.parse_args(argv)
    try:
        ports = parse_ports(args.ports)
    except ValueError as e:
        parser.error(f"--ports {e}")
    if busy := busy_ports(ports[:3]):
        print(
            f"demo: 127.0.0.1:{busy[0]} is already in use (`make run`?) — stop it, or choose free ports, e.g. "
            f"make demo PORTS={','.join(map(str, free_ports(len(ports))))}",
            file=sys.stderr,
        )
        return 1
    layout = Layout()
    created = init(layout)
    print(f"PKI: {'created ' + ', '.join(created) if created else 'kept the existing one'} in {layout.out}/\n")

    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as scratch:
        stranger_cert, stranger_key = (
            load_issuer(layout)
            .issue("stranger", uris=[Policy.load().spiffe_id("stranger")], usages=["client"])
            .write(Path(scratch))
        )
        forged_cert, forged_key = self_signed("service-a", dns=["service-a"]).write(Path(scratch), "self-signed")
        a, b, c, _ = ports
        client = (layout.cert("client"), layout.key("client"))
        scenes = [
            Scene(
                "the client calls service-a: the whole chain",
                a,
                "service-a",
                *client,
                "ok",
                f"mesh-client https://127.0.0.1:{a}/chain",
            ),
            Scene(
                "no client certificate at all",
                a,
                "service-a",
                None,
                None,
                "refused before HTTP",
                f"mesh-client https://127.0.0.1:{a}/chain --no-cert",
            ),
            Scene(
                "the client skips a hop and calls service-b directly",
                b,
                "service-b",
                *client,
                "403 from service-b",
                f"mesh-client https://127.0.0.1:{b}/chain --server-name service-b",
            ),
            Scene(
                "the client calls service-c directly",
                c,
                "service-c",
                *client,
                "403 from service-c",
                f"mesh-client https://127.0.0.1:{c}/chain --server-name service-c",
            ),
            Scene(
                "a new identity, issued by our own CA, on no allow-list",
                a,
                "service-a",
                stranger_cert,
                stranger_key,
                "403 from service-a",
                "mesh-pki issue stranger --client-only && "
                f"mesh-client https://127.0.0.1:{a}/chain --cert pki/out/stranger.crt --key pki/out/stranger.key",
            ),
            Scene(
                "a self-signed certificate claiming to be service-a",
                a,
                "service-a",
                forged_cert,
                forged_key,
                "refused before HTTP",
                f"mesh-client https://127.0.0.1:{a}/chain --cert self-signed.crt --key self-signed.key",
            ),
        ]
        processes = [
            ServiceProcess(env, Path(scratch) / f"{env['MESH_NAME']}.log")
            for env in chain_environments(ports[:3], layout.out)
        ]
        try:
            with running(processes):
                print(f"mesh up: {' → '.join(f'{n} :{p}' for n, p in zip(CHAIN, ports[:3], strict=True))}\n")
                failures = sum(not play(scene, layout) for scene in scenes)
        except RuntimeError as e:
            print(f"demo: could not start the mesh: {e}", file=sys.stderr)
            return 1
    print("mesh stopped.")
    if failures:
        print(f"demo: {failures} call(s) did not end as expected", file=sys.stderr)
        return 1
    print("Every caller was refused where it had no business, and the chain worked for the one that had.")
    return 0


def play(scene: Scene, layout: Layout) -> bool:
    print(f"▶ {scene.title}\n  $ {scene.cli}")
    material = TLSMaterial(ca=layout.ca_cert, cert=scene.cert, key=scene.key, crl=layout.crl)
    check = callee_check(authorize_id(default_server_id(scene.server_name, scene.cert, layout.cert("client"))))
    outcome = call(f"https://127.0.0.1:{scene.port}/chain", scene.server_name, material, check)
    print("  " + outcome.text.replace("\n", "\n  ") + "\n")
    return outcome.ok if scene.expect == "ok" else (not outcome.ok and outcome.text.startswith(scene.expect))


if __name__ == "__main__":
    sys.exit(main())
