"""`--version` for the seven `mesh-*` commands: the version of the installed mtls-mesh."""

from __future__ import annotations

import argparse
import importlib.metadata

__all__ = ["add_version"]


def add_version(parser: argparse.ArgumentParser) -> None:
    """Give `parser` a `--version` option that prints, for example, "python -m pki 0.1.0" and exits."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('mtls-mesh')}")
