"""`python -m cockpit status` (`make status`): is the mesh healthy? One ✔ or ✖ line per fact, the fix on each ✖.

    python -m cockpit status                                  # make run's mesh: 8443,8444,8445,8446
    python -m cockpit status --ports 9443,9444,9445,9446      # A, B, C and the token service elsewhere
    python -m cockpit status --service service-a=https://mesh.example:8443 …
    python -m cockpit status --json                           # for scripts

Exit status 0 only when every line is ✔ (for CI and cron), 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cockpit.collect import SERVICES, collect, local_targets, parse_targets
from cockpit.status import as_json, judge, render
from pki.authority import PKIError
from pki.policy import POLICY_FILE
from services.local import DEFAULT_PORTS, parse_ports
from shared.cli import add_version
from shared.layout import DEFAULT_OUT, Layout
from shared.x509 import MaterialError

PORTS = ",".join(map(str, DEFAULT_PORTS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cockpit", description=__doc__.split("\n")[0])
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("status", help="read every service as the operator and say what is not well")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ports", default=PORTS, help=f"127.0.0.1 ports of {','.join(SERVICES)} (default: {PORTS})")
    where.add_argument("--service", action="append", metavar="NAME=URL", help="a service to read (repeatable)")
    p.add_argument(
        "--pki-dir", type=Path, default=DEFAULT_OUT, help="PKI directory (default: $MESH_PKI_DIR, else pki/out)"
    )
    p.add_argument("--policy", type=Path, default=POLICY_FILE, help="policy file (default: pki/policy.toml)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per service (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable: the checks and everything read")
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.service) if args.service else local_targets(parse_ports(args.ports))
    except ValueError as e:
        parser.error(str(e) if args.service else f"--ports {e}")
    try:
        mesh = collect(targets, Layout(args.pki_dir), args.policy, timeout=args.timeout)
    except (MaterialError, PKIError) as e:  # a file it reads, or the policy, is missing or malformed
        print(f"status: {e}", file=sys.stderr)
        return 1
    checks = judge(mesh)
    print(json.dumps(as_json(mesh, checks), indent=2) if args.json else render(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
