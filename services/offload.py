"""Where a reload reads its files: never on the event loop, and for a large file not even in this process.

A read is a pure function of a file (`shared.tls.read`, `AllowList.load`, `TokenPolicy.load`) with a picklable
result. A worker thread is enough for the files a mesh usually has (a few kilobytes: microseconds). It is not
for a CRL or an allow-list of 100,000 entries: parsing them holds the interpreter lock — for tens of
milliseconds at a time in cryptography's Rust, and in a Python loop it takes it back from the event loop every
few milliseconds for half a second — and every request in flight waited (p99 ×7 to ×10 while they were
reloaded every second, bench.scaling). So a file over LARGE bytes is read in a child process, started on first
need and kept: lowest priority, ignoring Ctrl-C (the service stops it), killed with the service. What comes back
is a set or a dict, unpickled in milliseconds. Why not always the child: starting it costs ~0.3 s of CPU, and
a mesh of small files would pay it in every service for nothing.

    offload = Offload()
    allow = await offload(AllowList.load, path, size=path.stat().st_size)
    offload.close()
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from services.local import die_with_parent
from shared.x509 import MaterialError

__all__ = ["LARGE", "Offload"]

T = TypeVar("T")

LARGE = 256 * 1024  # bytes: a CRL of ~6,000 entries, an allow-list of ~3,000 lines (~15 ms to read in a thread)


class Offload:
    """Runs `read(*args)` off the event loop: on a worker thread, or in the child process when `size` ≥ LARGE."""

    def __init__(self, large: int = LARGE) -> None:
        self.large = large
        self._child: ProcessPoolExecutor | None = None

    async def __call__(self, read: Callable[..., T], *args: Any, size: int) -> T:
        if size < self.large:
            return await asyncio.to_thread(read, *args)
        try:
            if self._child is None:
                self._child = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_in_the_background,
                    initargs=(os.getpid(),),
                )
            reading = asyncio.get_running_loop().run_in_executor(self._child, read, *args)
        except OSError:  # no child process here (its queue needs /dev/shm): a thread is still off the loop
            return await asyncio.to_thread(read, *args)
        try:
            return await reading
        except BrokenProcessPool:  # it was killed (out of memory?): the next read starts another
            self._child = None
            raise MaterialError(
                "the process reading a large file died: it is tried again when the file changes"
            ) from None

    def close(self) -> None:
        if self._child is not None:
            self._child.shutdown(wait=False, cancel_futures=True)
            self._child = None


def _in_the_background(service: int) -> None:
    """In the child, first: yield the CPU to the service, leave Ctrl-C to it, and end with it."""
    os.nice(19)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != service:  # it died before prctl: nobody would ever signal us
        os._exit(1)
