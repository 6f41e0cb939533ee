"""Where a reload reads its files: never on the event loop, and for a large file not even in this process.

A read is a pure function of a file (`shared.tls.read`, `AllowList.load`, `TokenPolicy.load`) with a picklable
result. A worker thread is enough for the files a mesh usually has (a few kilobytes: microseconds). It is not
for a CRL or an allow-list of 100,000 entries: parsing them holds the interpreter lock — for tens of
milliseconds at a time in cryptography's Rust, and in a Python loop it takes it back from the event loop every
few milliseconds for half a second — and every request in flight waited (p99 ×7 to ×10 while they were
reloaded every second, bench.scaling). So a file over LARGE bytes is read in a child process, started on first
need and kept: at a low priority (nice 10), ignoring Ctrl-C (the service stops it), killed with the service. What
comes back is packed (shared.packed): unpickled in a millisecond. Why not always the child: starting it costs
about a second of CPU (it imports the service's modules again), which a mesh of small files would pay in every
service for nothing. Where no child can start (its queue needs /dev/shm), or it dies or hangs, the file is read
on the thread.

    offload = Offload()
    allow = await offload(AllowList.load, path, size=path.stat().st_size)
    offload.close()
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from typing import Any, TypeVar

from services.children import die_with_parent

__all__ = ["LARGE", "PATIENCE", "STARTING", "Offload"]

T = TypeVar("T")

LARGE = 256 * 1024  # bytes: a CRL of ~6,000 entries, an allow-list of ~3,000 lines (~15 ms to read in a thread)
PATIENCE = 30.0  # seconds: a 100,000-entry CRL takes ~0.4 s; a child this late is stuck (or starved), and goes
STARTING = 60.0  # seconds more for the read that starts a child: ~1 s of CPU at a low priority, on a busy host longer

log = logging.getLogger("mesh.reload")


class Offload:
    """Runs `read(*args)` off the event loop: on a worker thread, or in the child process when `size` ≥ LARGE."""

    def __init__(self, large: int = LARGE, patience: float = PATIENCE) -> None:
        self.large, self.patience = large, patience
        self._child: ProcessPoolExecutor | None = None
        self._closed = False

    async def __call__(self, read: Callable[..., T], *args: Any, size: int) -> T:
        if size >= self.large and not self._closed:
            try:
                return await self._in_child(read, *args)
            except _NoChild as e:
                # No child here (its queue needs /dev/shm), or it died (killed, out of memory) or hangs: it goes
                # (the next large read starts another), and this file is read on the thread. That may stall requests
                # for a moment; leaving a new CRL untaken would leave a revoked certificate in.
                self._stop()
                log.warning("reload_in_thread", extra={"reason": f"the reading process failed: {e.__cause__!r}"})
        return await asyncio.to_thread(read, *args)

    async def _in_child(self, read: Callable[..., T], *args: Any) -> T:
        """The read's own errors come back as they are; the child's failures as _NoChild."""
        starting = self._child is None
        try:
            if starting:
                self._child = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_in_the_background,
                    initargs=(os.getpid(),),
                )
            reading = asyncio.get_running_loop().run_in_executor(self._child, read, *args)
        except (OSError, NotImplementedError, BrokenExecutor) as e:  # cannot start, or died while idle
            raise _NoChild from e
        try:
            return await asyncio.wait_for(reading, self.patience + (STARTING if starting else 0))
        except (BrokenExecutor, TimeoutError) as e:  # died mid-read, or no answer in time
            raise _NoChild from e

    def close(self) -> None:
        """Stop the child, if one was started, and start none again (the service is stopping)."""
        self._closed = True
        self._stop()

    def _stop(self) -> None:
        if self._child is not None:  # killed: a hung one would not stop by itself
            for process in list((getattr(self._child, "_processes", None) or {}).values()):
                process.kill()
            self._child.shutdown(wait=False, cancel_futures=True)
            self._child = None


class _NoChild(Exception):
    """The child could not read (its cause says why): read on the thread instead."""


def _in_the_background(service: int) -> None:
    """In the child, first: yield the CPU to the service, leave Ctrl-C to it, and end with it. (services.children ties
    its children the same way, in a closure: a spawned child needs a module-level function.)"""
    os.nice(10)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != service:  # it died before prctl: nobody would ever signal us
        os._exit(1)
