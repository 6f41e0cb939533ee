"""What every command line of the project says alike: its version, the installed mtls-mesh's."""

from __future__ import annotations

import argparse
import importlib.metadata

__all__ = ["add_version"]


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: "python -m pki 0.1.0"."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('mtls-mesh')}")
