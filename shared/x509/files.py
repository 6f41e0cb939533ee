"""Reading the files that decide who gets in — keys, CA bundle, CRL, allow-lists — and refusing unsafe ones.

Whoever can write one of these files decides who is trusted: a writable allow-list or `ca.crt` widens
access as soon as the service reloads it. So, like ssh with its `authorized_keys`, a service refuses a
file that belongs to another user or that other users may change, and a private key that they may read
(except, as PostgreSQL allows, a root-owned key readable by the service's own group: a Kubernetes Secret).
The checks run on the open file (fstat), so what is checked is what is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class MaterialError(Exception):
    """A certificate, key, CRL or allow-list cannot be used; the message names the file and what to do."""


def read_protected(path: Path, what: str, *, private: bool = False) -> bytes:
    """The bytes of `path`, or MaterialError with a sentence naming the file and the fix.

    `what` names the file for people ("allow-list", "CA file"); `private` also forbids reading by others.

        data = read_protected(Path("pki/out/ca.crt"), "CA file")
    """
    try:
        with path.open("rb") as f:
            info = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        raise MaterialError(f"{path}: {what} not found — run `make pki`, or point MESH_PKI_DIR at it") from None
    except OSError as e:
        raise MaterialError(f"{path}: cannot read {what} ({e.strerror})") from None
    if info.st_uid not in (0, os.geteuid()):
        raise MaterialError(
            f"{path}: {what} belongs to uid {info.st_uid}, who could change it; it must belong to root or to "
            f"uid {os.geteuid()} (this service) — `chown {os.geteuid()} {path}`"
        )
    mode = stat.S_IMODE(info.st_mode)
    if private and mode & (stat.S_IRWXG | stat.S_IRWXO) and not _root_owned_for_our_group(info):
        raise MaterialError(f"{path}: {what} is accessible by other users (mode {mode:04o}) — run `chmod 600 {path}`")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise MaterialError(
            f"{path}: {what} is writable by other users (mode {mode:04o}), who could widen who is trusted — "
            f"run `chmod go-w {path}`"
        )
    return data


def _root_owned_for_our_group(info: os.stat_result) -> bool:
    """PostgreSQL's rule for its key file: one owned by root may also be read by the group (0440/0640), when
    that group is ours. That is how Kubernetes mounts a Secret for a non-root container: owned by root,
    group `fsGroup`, which only the pod's own processes are in."""
    mode = stat.S_IMODE(info.st_mode)
    ours = info.st_gid == os.getegid() or info.st_gid in os.getgroups()
    return info.st_uid == 0 and ours and not mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO)
