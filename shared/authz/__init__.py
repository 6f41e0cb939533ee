"""Whether a verified caller may come in: allow-lists, the rules that read like sentences, the guard applying them."""

from __future__ import annotations

from shared.authz.allowlist import AllowList
from shared.authz.guard import Admitted, Authorizers, Guard, authz_decisions
from shared.authz.rules import (
    Authorizer,
    Decision,
    authorize_all,
    authorize_client_leaf,
    authorize_id,
    authorize_ids,
    authorize_listed,
    authorize_trusted_now,
)

__all__ = [
    "Admitted",
    "AllowList",
    "Authorizer",
    "Authorizers",
    "Decision",
    "Guard",
    "authorize_all",
    "authorize_client_leaf",
    "authorize_id",
    "authorize_ids",
    "authorize_listed",
    "authorize_trusted_now",
    "authz_decisions",
]
