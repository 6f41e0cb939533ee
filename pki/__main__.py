"""`python -m pki`: make and inspect the mesh's certificates. `python -m pki --help` lists the commands."""

from __future__ import annotations

import sys

from pki.authority import PKIError
from pki.check import gate
from pki.cli import build_parser
from pki.lock import pki_lock
from shared.layout import Layout
from shared.x509 import MaterialError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(args.out)
    try:
        if args.lock == "none":
            args.func(args, layout)
            return 0
        # Every command that writes: not while something is broken that no command repairs (pki.check).
        # `init --force` is how a broken CA is replaced; it needs a readable policy only.
        if not getattr(args, "force", False):
            gate(layout, args.policy)
        if args.lock == "itself":
            args.func(args, layout)
        else:
            with pki_lock(layout, f"python -m pki {args.command}"):
                args.func(args, layout)
    except (PKIError, MaterialError, ValueError) as e:
        print(f"pki: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
