"""What the token service may grant, decided from `tokens.json` (rendered from pki/policy.toml by `make pki`).

Two grants, each a short list of rules, each refusal naming the rule (RFC 6749 §5.2 error codes):

- **a user token** (`grant_user_token`): only an *edge* — an identity that authenticates its users itself —
  may ask for a token in a user's name, only for a service it may call, with at most the user's scopes;
- **an exchange** (`grant_exchange`, RFC 8693): a holder trades a token *it was given* (`aud` is the holder) for
  one addressed to a service *it may call*, for the same user, with no scope the given token lacks — and none the
  policy no longer gives the user, the holder's own included: the policy in force decides, not the one the given
  token was issued under (a user removed from it gets no further token, however long the given one still lives;
  the services ask again at least every 30 s, `shared.tokens.client.REUSE_FOR`).

    policy = TokenPolicy.load(Path("pki/out/tokens.json"))
    policy.grant_exchange("service-a", subject_token, audience="service-b", requested=None)   # → the scopes
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.problem import echo
from shared.tokens import UserToken
from shared.x509 import InvalidSpiffeId, MaterialError, PeerIdentity, SpiffeId, read_protected

__all__ = ["GrantRefused", "TokenPolicy"]


class GrantRefused(Exception):
    """RFC 6749 §5.2: `error` is the code, the message is the `error_description`."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error, self.description = error, description


@dataclass(frozen=True)
class TokenPolicy:
    trust_domain: str
    lifetime: int  # seconds
    edges: frozenset[str]
    users: dict[str, frozenset[str]]  # user → scopes (the services they may reach)
    may_call: dict[str, frozenset[str]]  # holder → the services it may call, so obtain tokens for

    @classmethod
    def load(cls, path: Path) -> TokenPolicy:
        # Like an allow-list, it decides who gets in: refused if others could change it (shared.x509.files).
        text = read_protected(path, "token policy")
        try:
            data: dict[str, Any] = json.loads(text)
            return cls(
                trust_domain=str(data["trust_domain"]),
                lifetime=int(data["lifetime_seconds"]),
                edges=frozenset(data["edges"]),
                users={user: frozenset(scopes) for user, scopes in data["users"].items()},
                may_call={holder: frozenset(callees) for holder, callees in data["may_call"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MaterialError(
                f"{path}: not a token policy ({type(e).__name__}: {e}) — run `make pki` to render it again"
            ) from None

    def holder(self, caller: PeerIdentity) -> str:
        """The caller's name in this mesh: the last segment of a SPIFFE ID of our own trust domain."""
        try:
            spiffe_id = SpiffeId.parse(caller.spiffe_id or "")
        except InvalidSpiffeId:
            spiffe_id = None
        if spiffe_id is None or spiffe_id.trust_domain != self.trust_domain or spiffe_id.path.count("/") != 1:
            raise GrantRefused("unauthorized_client", f"{caller.subject} has no SPIFFE ID of {self.trust_domain}")
        return spiffe_id.path[1:]

    def grant_user_token(
        self, holder: str, user: str, audience: str, requested: frozenset[str] | None
    ) -> frozenset[str]:
        if holder not in self.edges:
            raise GrantRefused(
                "unauthorized_client",
                f"{holder} is not an edge: only {', '.join(sorted(self.edges)) or 'nobody'} may ask for a token "
                "in a user's name; a service can only exchange a token it was given",
            )
        self._known(user)
        self._may_call(holder, audience)
        return self._scopes(requested, self.users[user], f"{user}'s scopes")

    def grant_exchange(
        self, holder: str, subject: UserToken, audience: str, requested: frozenset[str] | None
    ) -> frozenset[str]:
        if subject.audience != holder:
            raise GrantRefused(
                "invalid_grant",
                f"the subject token is for {subject.audience}, not for {holder}: it was not given to you",
            )
        self._known(subject.subject)
        if holder not in self.users[subject.subject]:  # as the holder checks the token's scope, but as of now
            raise GrantRefused(
                "invalid_grant",
                f"{holder} is no longer in {subject.subject}'s scopes: the policy has narrowed them since",
            )
        self._may_call(holder, audience)
        # The audience need not be among the scopes: whether it admits the user is its own check, as for any token.
        scopes = subject.scopes & self.users[subject.subject]
        return self._scopes(
            requested, scopes, f"{subject.subject}'s scopes (the subject token's, as the policy now has them)"
        )

    def _known(self, user: str) -> None:
        if user not in self.users:
            raise GrantRefused("invalid_grant", f"no user {echo(user)} in the policy")

    def _may_call(self, holder: str, audience: str) -> None:
        if audience not in self.may_call.get(holder, frozenset()):
            raise GrantRefused(
                "invalid_target", f"{holder} may not call {echo(audience, quote=False)}, so it gets no token for it"
            )

    @staticmethod
    def _scopes(requested: frozenset[str] | None, allowed: frozenset[str], what: str) -> frozenset[str]:
        if requested is None:
            return allowed
        if wider := sorted(requested - allowed):
            raise GrantRefused(
                "invalid_scope", f"{echo(', '.join(wider), quote=False)} is not in {what}: scopes never widen"
            )
        return requested
