"""Deploying the PKI to containers: each identity gets exactly its own material, owned by its own user."""

from __future__ import annotations

import os
from pathlib import Path

from pki.authority import PKIError
from pki.output import write_file
from pki.policy import Policy
from shared.layout import Layout
from shared.tokens import TOKEN_SERVICE

__all__ = ["deploy"]


def deploy(layout: Layout, policy: Policy, name: str, dest: Path, owner: tuple[int, int]) -> list[str]:
    """Copy into `dest` what identity `name` needs and nothing else, owned by the user it runs as.

    Its own key and certificate, the trust anchor, the CRL, and — for a service — its allow-list and the
    metrics allow-list; for the token service, the token policy too. No other identity's key: a compromised
    container must yield only its own. Anything else found in `dest` is removed. Keys stay 0600, which is why
    they must belong to `owner`. Returns the files copied, relative to `dest`.

        deploy(Layout(), Policy.load(), "service-b", Path("/deploy/service-b"), (10002, 10002))
    """
    if name not in policy.services and name not in policy.clients:
        raise PKIError(f"{name!r} is not in the policy: deploy one of {', '.join(policy.services + policy.clients)}")
    wanted = [layout.ca_cert, layout.crl, layout.cert(name), layout.key(name)]
    if name in policy.services:
        wanted += [layout.allow_list(name), layout.metrics_allow_list]
    if name == TOKEN_SERVICE:
        wanted.append(layout.tokens_policy)
    relative = {source.relative_to(layout.out): source for source in wanted}
    for existing in list(dest.rglob("*")):
        if not existing.is_dir() and existing.relative_to(dest) not in relative:
            existing.unlink()  # left by an older deploy: no file stays that this identity does not need
    os.chown(dest, *owner)
    for target, source in relative.items():
        if not source.exists():
            raise PKIError(f"{source}: missing — run `make pki` first")
        if target.parent != Path("."):
            (dest / target.parent).mkdir(exist_ok=True)
            os.chown(dest / target.parent, *owner)
        write_file(dest / target, source.read_bytes(), private=source.suffix == ".key", owner=owner)
    return sorted(map(str, relative))
