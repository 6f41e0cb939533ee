"""A running service's answer to changed files: check them in isolation, swap them in, or keep the old.

`shared.reload.Watcher` says which files changed; the `Reloader` decides what that means:

- a file of the service's registry (services.wiring: `Service.reloads` — its allow-lists, the token service's
  policy): the part it feeds is replaced whole (a broken file is refused, the old part stays);
- the certificate, key, CA or CRL: the new trust is swapped in (shared.tls.LiveTLS; new TLS contexts too, unless
  a CRL alone changed), every open connection of a caller a new handshake would refuse (revoked, expired, or
  issued by a CA — by key — no longer trusted) is closed, and ours to such a callee retired; with new contexts,
  the pools towards the next hop and the token service are replaced, so that they are checked again too.

A handshake checks a certificate once per connection (every request meets the trust in force too, at the guard:
shared.authz.authorize_trusted_now), which is why the last two steps exist.

`TrustClock` watches the clock rather than the files: a certificate, or a CRL in force, that expires makes its
peers refused with no file changing. It closes their connections (retires ours to them) as a reload would,
reports each CRL's time left per issuer (/metrics) and warns well before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from services.offload import Offload
from shared.inbound import close_where
from shared.outbound import Downstream, nativetls
from shared.tls import LiveTLS, read
from shared.x509 import MaterialError, PeerIdentity

__all__ = ["WARN_AT", "Reload", "Reloader", "TrustClock", "close_untrusted"]

T = TypeVar("T")


@dataclass(frozen=True)
class Reload(Generic[T]):
    """How a changed file is taken in: `read` it — load and check it, or raise MaterialError naming it — and
    `take` what it read, swapping in whole the part it feeds. `read` runs off the event loop, maybe in another
    process (services.offload): a module-level function, returning something picklable. `take` runs on the loop."""

    read: Callable[[Path], T]
    take: Callable[[T], None]


log = logging.getLogger("mesh.reload")
EXPIRED = "the peer's certificate, or its CA's CRL, has expired since the connection opened"

# The renewer re-signs a CRL at half its life (pki.revocation): a quarter left means it has not, for a while.
WARN_AT = 0.25  # of a CRL's lifetime (nextUpdate − lastUpdate) left
# What to do about it, in every warning: the renewer re-signs every CRL whose key we hold, both intermediates'
# during a stalled CA rollover; `make pki` does the same once.
FIX = (
    "the renewer (`python -m pki renew --watch`: `make run` starts it, in Docker the `renewer` container) re-signs "
    "every CRL at half its life — check that it runs and look for renewal_failed in its log; `make pki` re-signs "
    "them now"
)


class Reloader:
    """Call it with the set of changed paths (from `Watcher`); it logs what it took and what it refused.

    reloader = Reloader(live, service.reloads, service.callees)
    Watcher([*live.material.files(), *service.reloads], reloader, interval=1.0)
    reloader.close()  # at the end: stops the process that reads large files, if one was started
    """

    def __init__(self, live: LiveTLS, reloads: Mapping[Path, Reload[Any]], callees: Sequence[Downstream] = ()) -> None:
        self.live, self.reloads, self.callees = live, reloads, callees
        self.tls_files = set(live.material.files())
        self.offload = Offload()

    async def __call__(self, changed: set[Path]) -> None:
        # Reading runs off the event loop (services.offload): a CRL or an allow-list of 100,000 entries takes
        # hundreds of milliseconds, which on the loop would stall every request in flight. What it read is taken
        # in whole, on the loop: a part of the registry by one assignment, the TLS material below.
        for path in sorted(changed & set(self.reloads)):
            reload = self.reloads[path]
            try:
                reload.take(await self.offload(reload.read, path, size=_size(path)))
                log.info("reloaded", extra={"files": [str(path)]})
            except Exception as e:  # a bad file (MaterialError) or a bug: either way, reloading goes on
                log.error("reload_refused", extra={"file": str(path), "reason": _why(e)}, exc_info=_is_bug(e))
        if tls_files := sorted(map(str, changed & self.tls_files)):
            await self._reload_tls(tls_files)

    def close(self) -> None:
        self.offload.close()

    async def _reload_tls(self, files: list[str]) -> None:
        material = self.live.material
        try:
            files_read = await self.offload(read, material, self.live.crls, size=sum(map(_size, material.files())))
            before, anchors = self.live.client, self.live.trust.anchors
            self.live.install(self.live.prepare(files_read))
        except Exception as e:
            log.error("reload_refused", extra={"files": files, "reason": _why(e)}, exc_info=_is_bug(e))
            return
        # How a CA replaced under a running service loses its peers, too; and, if a CA left ca.crt, every peer on a
        # resumed session, whose CA we cannot tell.
        closed = close_untrusted(self.live, resumed_too=bool(anchors - self.live.trust.anchors))
        if self.live.client is not None and self.live.client is not before:  # not after a CRL alone (LiveTLS.prepare)
            for callee in self.callees:  # the next hop, the token service
                callee.renew(self.live.client)
        log.info("reloaded", extra={"files": files, "revoked_connections_closed": closed})


def close_untrusted(live: LiveTLS, *, resumed_too: bool = False) -> int:
    """Close every open connection of a caller to us whose peer a handshake completing now would refuse
    (LiveTLS.refusal: revoked, expired, from a CA — by key — no longer trusted, or from one whose CRL is not in its
    validity), and retire ours to such a callee (shared.outbound.nativetls); how many.

    `resumed_too`, after a CA left ca.crt: close every connection on a resumed TLS session as well. Its peer
    shows no chain, so no CA to check against ca.crt; a session is resumed only under the contexts that made it
    (LiveTLS.recheck), and this closes the connections already open on one."""

    def untrusted(peer: PeerIdentity) -> bool:
        return (resumed_too and peer.anchor is None) or live.refusal(peer) is not None

    return close_where(untrusted) + nativetls.retire_where(untrusted)


class TrustClock:
    """What the clock alone changes. Each tick, the connections whose peer's certificate, or whose CA's CRL, has
    expired since are closed (a caller's) or retired (ours to a callee), as a reload does with those it revokes.
    And how long each CRL in force has left, by issuer; a warning (once per CRL) when under WARN_AT of its
    lifetime, an error once it has expired: from then on every leaf of that CA is refused (LiveTLS.refusal).

    clock = TrustClock(live)
    Gauge("mesh_crl_next_update_seconds", "…", clock.seconds_left, label="issuer")
    asyncio.create_task(clock.watch(interval=1.0))
    """

    def __init__(self, live: LiveTLS) -> None:
        self.live = live
        self._said: set[tuple[str, str, dt.datetime]] = set()  # (event, issuer, lastUpdate): each said once

    def seconds_left(self) -> dict[str, float]:
        now = dt.datetime.now(dt.UTC)
        return {
            crl.issuer: (crl.next_update - now).total_seconds() for crl in self.live.crls if crl.next_update is not None
        }

    def check(self) -> None:
        now = dt.datetime.now(dt.UTC)
        for crl in self.live.crls:
            if crl.next_update is None:
                continue
            left, lifetime = crl.next_update - now, crl.next_update - crl.last_update
            if left.total_seconds() <= 0:
                level, event, when = logging.ERROR, "crl_expired", "expired"
            elif left < lifetime * WARN_AT:
                level, event, when = logging.WARNING, "crl_expiring", "expires"
            else:
                continue
            issuer = crl.issuer
            if (event, issuer, crl.last_update) in self._said:
                continue
            self._said.add((event, issuer, crl.last_update))
            log.log(
                level,
                event,
                extra={
                    "file": str(self.live.material.crl),
                    "issuer": issuer,
                    "next_update": f"{crl.next_update:%Y-%m-%dT%H:%M:%SZ}",
                    "seconds_left": round(left.total_seconds(), 1),
                    "reason": f"the CRL of {issuer} {when} at {crl.next_update:%Y-%m-%d %H:%M:%S}Z: from then "
                    "on every certificate of that CA is refused",
                    "fix": FIX,
                },
            )

    async def watch(self, interval: float) -> None:
        while True:
            try:
                self.check()
                if closed := close_untrusted(self.live):
                    log.warning("expired_connections_closed", extra={"closed": closed, "reason": EXPIRED})
            except Exception as e:  # a bug: said, and the clock goes on (a stopped clock would warn of nothing)
                log.error("trust_clock_failed", extra={"reason": _why(e)}, exc_info=True)
            await asyncio.sleep(interval)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # gone: reading it says so, in a thread


def _why(error: Exception) -> str:
    """A bad file's MaterialError names it and the fix; anything else is a bug, named by its class."""
    return f"{type(error).__name__}: {error} (a bug: please report it)" if _is_bug(error) else str(error)


def _is_bug(error: Exception) -> bool:
    return not isinstance(error, MaterialError)  # logged with its traceback
