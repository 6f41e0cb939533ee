"""Writing the CA's files: atomically (a reader never sees half a file), private ones 0600 from the start.

Services poll these files and reload them live, so a half-written certificate must never be visible, and a
key must never exist for an instant with a wider mode than 0600.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_file"]


def write_file(path: Path, data: bytes, *, private: bool = False, owner: tuple[int, int] | None = None) -> None:
    """Write atomically (a reader never sees half a file); private files are created 0600 from the start.

    The file belongs to `owner` (uid, gid) if given; otherwise, when we run as root (the compose pki job),
    to whoever owns the directory: root writing into your checkout must not leave you files you cannot read.
    """
    _make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        if owner is None and os.geteuid() == 0:
            parent = path.parent.stat()
            owner = (parent.st_uid, parent.st_gid)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_dir(path: Path) -> None:
    if path.is_dir():
        return
    _make_dir(path.parent)
    path.mkdir()
    if os.geteuid() == 0:
        parent = path.parent.stat()
        os.chown(path, parent.st_uid, parent.st_gid)
