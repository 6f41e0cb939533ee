"""The token service as the services use it, over mTLS like every other call: its key set, to check the
tokens they are called with, and RFC 8693 exchange, to get a token for the next hop.

    to_tokens = Downstream("service-a", "token-service", url, context, 5.0, token_service_id)
    tokens = TokenClient(to_tokens, issuer, generation)
    user = await tokens.verify(raw, audience="service-a")        # TokenRefused if a rule fails
    onward = await tokens.exchange(user, audience="service-b")   # a token for B, bound to our certificate
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from shared.outbound.downstream import Downstream
from shared.problem import Problem
from shared.tokens.token import ACCESS_TOKEN_TYPE, EXCHANGE_GRANT, LEEWAY_SECONDS, UserToken, verify

__all__ = ["TokenClient"]

# Anyone who can reach a service can send tokens naming kids that nobody publishes, as many as it likes; each
# must not become a request to the token service. So a fetch is never started while one is under way (the
# requests that need it wait for it), and the key set it brought is the answer for every kid it lacks until
# REFETCH_AFTER has passed: at most one fetch per REFETCH_AFTER, however many tokens and kids.
REFETCH_AFTER = 5.0
KEYS_MAX_AGE = 60.0  # keys the token service stopped publishing are dropped within this
RETRY_AFTER = 1.0  # a fetch that failed is not tried again sooner: a token service that is down is not flooded
CACHE_MARGIN = 10.0  # an exchanged token is reused until this many seconds before it expires…
# …and for REUSE_FOR seconds at most: each exchange meets the token service's policy in force, so a user taken out
# of it, or a scope narrowed, is refused at every hop within this (reused until its expiry, a user removed went on
# through the whole chain for minutes).
REUSE_FOR = 30.0
CACHE_SIZE = 1024  # exchanged tokens, and verified ones, each


class TokenClient:
    def __init__(self, connection: Downstream, issuer: str, generation: Callable[[], int]) -> None:
        self.connection, self.issuer = connection, issuer
        # Our TLS material's generation: a renewed certificate makes every cached token (bound to the old
        # one) useless, so it is part of the cache key.
        self.generation = generation
        self._keys, self._kids, self._fetched = KeySet([]), frozenset[str](), float("-inf")
        self._attempted = float("-inf")  # when the last fetch started, whatever came of it
        self._failure: str | None = None  # why the last fetch failed, if it did
        self._fetching = asyncio.Lock()
        self._exchanged: OrderedDict[tuple[str, str, int], tuple[str, float]] = OrderedDict()  # → (token, reuse until)
        # Tokens verified already, by (token, audience): with the key that verified them (kid, RFC 7638 thumbprint).
        self._verified: OrderedDict[tuple[str, str], tuple[UserToken, str, str]] = OrderedDict()
        self._thumbprints: dict[str, str] = {}  # kid → thumbprint of the key published under it now

    async def verify(self, raw: str, audience: str) -> UserToken:
        """`shared.tokens.verify` against the token service's published keys (fetched when a kid is new).

        A token verified before (the same bytes, for the same audience) is not verified again — three ES256
        verifications and the claim rules were most of what user tokens added to the chain — as long as the key
        that verified it is still published, unchanged, in a key set fetched within KEYS_MAX_AGE, and it has not
        expired. Whatever depends on the connection (cnf, the current actor: check_holder) and the scope is still
        checked on every request, by OnBehalfOf, whether the token came from here or from `verify`.
        """
        kid = _kid(raw)
        if self._stale() or (kid is not None and kid not in self._kids):
            async with self._fetching:  # a fetch under way: wait for it rather than start another
                if self._fetch_due(kid):
                    await self._fetch_keys()
            if self._stale():  # the fetch failed, just now or less than RETRY_AFTER ago
                reason = self._failure or "no key set fetched yet"
                raise self.connection.failure(f"no current key set to check the token with: {reason}")
        if (cached := self._verified.get((raw, audience))) is not None:
            token, signed_by, thumbprint = cached
            if self._thumbprints.get(signed_by) == thumbprint and time.time() <= token.expires_at + LEEWAY_SECONDS:
                self._verified.move_to_end((raw, audience))
                return token
            del self._verified[(raw, audience)]  # and verified afresh: refused, naming the rule it now breaks
        token = verify(raw, self._keys, issuer=self.issuer, audience=audience)
        if kid is not None and kid in self._thumbprints:  # verify checked the token names the key that signed it
            self._verified[(raw, audience)] = (token, kid, self._thumbprints[kid])
            while len(self._verified) > CACHE_SIZE:
                self._verified.popitem(last=False)
        return token

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched > KEYS_MAX_AGE

    def _fetch_due(self, kid: str | None) -> bool:
        since = time.monotonic() - self._attempted
        if self._stale():
            return since > RETRY_AFTER
        return kid is not None and kid not in self._kids and since > REFETCH_AFTER

    async def exchange(self, token: UserToken, audience: str) -> str:
        """RFC 8693: `token` (given to us) for one addressed to `audience`, bound to our certificate; reused for
        REUSE_FOR seconds at most, and never within CACHE_MARGIN of its expiry."""
        key = (token.raw, audience, self.generation())
        if (cached := self._exchanged.get(key)) and time.time() < cached[1]:
            self._exchanged.move_to_end(key)
            return cached[0]
        response = await self.connection.send(
            "POST",
            "/token",
            data={
                "grant_type": EXCHANGE_GRANT,
                "subject_token": token.raw,
                "subject_token_type": ACCESS_TOKEN_TYPE,
                "audience": audience,
            },
        )
        body = _json(response.content)
        if response.status_code != 200 or not isinstance(body.get("access_token"), str):
            said = f"{body.get('error')}: {body.get('error_description')}" if "error" in body else ""
            reason = f"{self.connection.name} refused the exchange for {audience}: {said or response.status_code}"
            raise self.connection.failure(reason)
        now = time.time()
        onward, expires = body["access_token"], now + float(body.get("expires_in", 0))
        self._exchanged[key] = (onward, min(expires - CACHE_MARGIN, now + REUSE_FOR))
        while len(self._exchanged) > CACHE_SIZE:
            self._exchanged.popitem(last=False)
        return onward

    async def _fetch_keys(self) -> None:
        self._attempted = time.monotonic()
        try:
            response = await self.connection.send("GET", "/jwks")
            if response.status_code != 200:
                raise self.connection.failure(f"GET /jwks answered HTTP {response.status_code}")
            try:
                keys = KeySet.import_key_set(_json(response.content))  # type: ignore[arg-type]
            except (JoseError, ValueError, KeyError, TypeError) as e:
                raise self.connection.failure(f"no usable key set at /jwks ({e})") from None
        except Problem as problem:
            self._failure = str(problem.extra.get("reason", problem.detail))
            raise
        self._keys, self._kids, self._fetched, self._failure = keys, _kids(keys), time.monotonic(), None
        self._thumbprints = {key.kid: key.thumbprint() for key in keys.keys if key.kid}


def _kids(keys: KeySet) -> frozenset[str]:
    return frozenset(key.kid for key in keys.keys if key.kid)


def _kid(raw: str) -> str | None:
    """The kid a token *claims*, unverified: only to decide whether fetching the key set again could help.
    None when there is none to look for (no string kid, or no header that parses): no fetch could help that."""
    try:
        header = json.loads(base64.urlsafe_b64decode(raw.split(".", 1)[0] + "==="))
    except (ValueError, RecursionError):  # not base64, not UTF-8, not JSON, or JSON nested past Python's stack
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None


def _json(content: bytes) -> dict[str, Any]:
    try:
        body = json.loads(content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
