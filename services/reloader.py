"""A running service's answer to changed files: check them in isolation, swap them in, or keep the old.

`shared.reload.Watcher` says which files changed; the `Reloader` decides what that means:

- an allow-list: its guard gets a new authorizer (a broken file is refused, the old list stays);
- the certificate, key, CA or CRL: new TLS contexts are built and swapped in (shared.tls.LiveTLS), every
  open connection of a caller a new handshake would refuse (revoked, expired, or issued by a CA — by key — no
  longer trusted) is closed, and the pools towards the next hop and the token service are replaced, so that
  they are checked again too.

Certificates are checked once per connection, which is why the last two steps exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from shared.allowlist import AllowList
from shared.authz import Authorizer
from shared.connections import close_where
from shared.downstream import Downstream
from shared.files import MaterialError
from shared.guard import Guard
from shared.tls import LiveTLS

__all__ = ["Reloader"]

log = logging.getLogger("mesh.reload")


class Reloader:
    """Call it with the set of changed paths (from `Watcher`); it logs what it took and what it refused.

    reloader = Reloader(live, {allow_path: guard}, service_policy)
    Watcher([*tls_files, allow_path], reloader, interval=1.0)
    """

    def __init__(
        self,
        live: LiveTLS,
        guards: dict[Path, Guard],
        policy: Callable[[AllowList], Authorizer],
        callees: list[Downstream] | None = None,
    ) -> None:
        self.live, self.guards, self.policy, self.callees = live, guards, policy, callees or []
        self.tls_files = set(live.material.files())

    def __call__(self, changed: set[Path]) -> None:
        for path in sorted(changed & set(self.guards)):
            try:
                self.guards[path].authorizer = self.policy(AllowList.load(path))
                log.info("reloaded", extra={"files": [str(path)]})
            except MaterialError as e:
                log.error("reload_refused", extra={"file": str(path), "reason": str(e)})
        if tls_files := sorted(map(str, changed & self.tls_files)):
            self._reload_tls(tls_files)

    def _reload_tls(self, files: list[str]) -> None:
        try:
            self.live.reload()
        except MaterialError as e:
            log.error("reload_refused", extra={"files": files, "reason": str(e)})
            return
        # The same rule a handshake completing from now on meets (LiveTLS.recheck): revoked, expired, or from a CA
        # — by key — no longer trusted, which is how a CA replaced under a running service loses its peers.
        closed = close_where(lambda caller: self.live.refusal(caller) is not None)
        if self.live.client is not None:
            for callee in self.callees:  # the next hop, the token service
                callee.renew(self.live.client)
        log.info("reloaded", extra={"files": files, "revoked_connections_closed": closed})
