"""One lock for everything that writes pki/out: `pki` commands, each renewer tick, each stage of a CA rollover.

    with pki_lock(layout, "pki revoke client"):
        ...                                   # nobody else writes pki/out meanwhile

Without it, two writers interleave: `make rotate-ca` and the renewer both rotated service-b, and one of
them found its successor gone ("no rotation of service-b is under way"); two read-modify-writes of the
revocation record would lose a revocation. A writer that finds the lock taken says who holds it and waits.

Why `fcntl.flock` from the standard library rather than the `filelock` package: the kernel releases the
lock when its holder dies, so there is never a stale lock to clear by hand; flock works between the host and
containers sharing the directory through a bind mount; the PKI is POSIX-only already (0600 keys, chown);
and filelock's Unix lock is this same call, behind a dependency. What it does not give us, and this module
adds, is the hand-off to a child command (below).

The lock is re-entrant within a process (a rollover stage renews through the renewer's code, which takes it
again). A command the holder runs and waits for — `rotate-ca --after-each-stage "make deploy-if-up"`, whose
pki job writes pki/out too — acts on the holder's behalf: it inherits MESH_PKI_LOCK, the token the holder
wrote into the lock file, and proceeds without waiting for a lock that would never be released.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.layout import Layout

__all__ = ["HAND_OFF", "pki_lock"]

HAND_OFF = "MESH_PKI_LOCK"
QUIET_WAIT = 1.0  # seconds of waiting before saying who holds the lock

_thread_lock = threading.RLock()  # threads of one process take turns; flock alone would let them all in
_depth = 0


@contextmanager
def pki_lock(layout: Layout, holder: str) -> Iterator[None]:
    """Hold pki/out's lock for the block; if another process holds it, print who and wait.

    `holder` says what is running ("pki rotate-ca, stage issue"): a writer that has to wait shows it.
    """
    global _depth
    with _thread_lock:
        if _depth or _on_behalf_of_holder(layout.lock):
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        layout.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _owned_like_the_directory(fd, layout.out)
            if not _try_for(fd, QUIET_WAIT):
                print(
                    f"{layout.out} is being written by {_holder(layout.lock)}: waiting until it is done",
                    file=sys.stderr,
                    flush=True,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
            token = secrets.token_hex(16)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{token} pid {os.getpid()}: {holder}\n".encode(), 0)
            os.environ[HAND_OFF] = token  # for the commands we run and wait for (see the module's docstring)
            _depth = 1
            try:
                yield
            finally:
                _depth = 0
                os.environ.pop(HAND_OFF, None)
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _try_for(fd: int, seconds: float) -> bool:
    """Try to take the lock for a moment: a renewer tick holds it for milliseconds, not worth a message."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _on_behalf_of_holder(lock: Path) -> bool:
    """True when our parent holds the lock and runs us: MESH_PKI_LOCK is the token it wrote into the file."""
    token = os.environ.get(HAND_OFF)
    if not token:
        return False
    try:
        return lock.read_text().split(" ", 1)[0] == token
    except OSError:
        return False


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().strip()
    except OSError:
        text = ""
    return text.split(" ", 1)[1] if " " in text else "another process"


def _owned_like_the_directory(fd: int, directory: Path) -> None:
    """As root (the compose pki job), leave the lock file to the directory's owner, as pki.output does."""
    if os.geteuid() == 0:
        parent = directory.stat()
        os.fchown(fd, parent.st_uid, parent.st_gid)
