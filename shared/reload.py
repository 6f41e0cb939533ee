"""Notice when files change — by polling their content, and at once on SIGHUP — and say which changed.

Why not `watchfiles` (inotify): Kubernetes updates a mounted Secret by swapping a symlink to a new directory,
which a watch on the files misses, and bind mounts from a host do not always deliver events to a container.
Hashing five small files a second works everywhere and costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path


class Watcher:
    """Calls `on_change(changed_paths)` from the event loop whenever any watched file's content changes (and
    awaits it, if it is a coroutine function: the next look waits until it is done).

    Polling content rather than waiting for inotify events works the same on a laptop, in a container on a
    read-only volume, and with files replaced by rename (which is how `pki` writes them).
    """

    def __init__(
        self, files: Iterable[Path], on_change: Callable[[set[Path]], Awaitable[None] | None], interval: float
    ) -> None:
        self.files = list(files)
        self.on_change = on_change
        self.interval = interval
        self._seen = {path: _digest(path) for path in self.files}
        self._wake = asyncio.Event()

    def trigger(self) -> None:
        """Look now (SIGHUP) instead of at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            # Off the loop: a CRL of 100,000 entries is megabytes to read and hash every interval.
            now = await asyncio.to_thread(lambda: {path: _digest(path) for path in self.files})
            changed = {path for path in self.files if now[path] != self._seen[path]}
            # Remember what we saw even if it turns out to be unusable: broken material is reported once,
            # and tried again as soon as it changes (for instance when the matching certificate arrives).
            self._seen = now
            if changed and inspect.isawaitable(result := self.on_change(changed)):
                await result


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None
