"""The token service as the services use it, over mTLS like every other call: its key set, to check the
tokens they are called with, and RFC 8693 exchange, to get a token for the next hop.

    tokens = TokenClient(Downstream("service-a", "token-service", url, context, 5.0), issuer, generation)
    user = await tokens.verify(raw, audience="service-a")        # TokenRefused if a rule fails
    onward = await tokens.exchange(user, audience="service-b")   # a token for B, bound to our certificate
"""

from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from shared.downstream import Downstream
from shared.tokens import ACCESS_TOKEN_TYPE, EXCHANGE_GRANT, UserToken, verify

__all__ = ["TokenClient"]

REFETCH_AFTER = 5.0  # an unknown kid fetches the key set again, but never more often: no amplification
KEYS_MAX_AGE = 60.0  # keys the token service stopped publishing are dropped within this
CACHE_MARGIN = 10.0  # an exchanged token is reused until this many seconds before it expires
CACHE_SIZE = 1024


class TokenClient:
    def __init__(self, connection: Downstream, issuer: str, generation: Callable[[], int]) -> None:
        self.connection, self.issuer = connection, issuer
        # Our TLS material's generation: a renewed certificate makes every cached token (bound to the old
        # one) useless, so it is part of the cache key.
        self.generation = generation
        self._keys, self._fetched = KeySet([]), float("-inf")
        self._exchanged: OrderedDict[tuple[str, str, int], tuple[str, float]] = OrderedDict()

    async def verify(self, raw: str, audience: str) -> UserToken:
        """`shared.tokens.verify` against the token service's published keys (fetched when a kid is new)."""
        now = time.monotonic()
        stale = now - self._fetched > KEYS_MAX_AGE
        unknown = _kid(raw) not in {key.kid for key in self._keys.keys}
        if stale or (unknown and now - self._fetched > REFETCH_AFTER):
            await self._fetch_keys()
        return verify(raw, self._keys, issuer=self.issuer, audience=audience)

    async def exchange(self, token: UserToken, audience: str) -> str:
        """RFC 8693: `token` (given to us) for one addressed to `audience`, bound to our certificate; cached."""
        key = (token.raw, audience, self.generation())
        if (cached := self._exchanged.get(key)) and cached[1] - time.time() > CACHE_MARGIN:
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
        onward, expires = body["access_token"], time.time() + float(body.get("expires_in", 0))
        self._exchanged[key] = (onward, expires)
        while len(self._exchanged) > CACHE_SIZE:
            self._exchanged.popitem(last=False)
        return onward

    async def _fetch_keys(self) -> None:
        response = await self.connection.send("GET", "/jwks")
        try:
            self._keys = KeySet.import_key_set(_json(response.content))  # type: ignore[arg-type]
        except (JoseError, ValueError, KeyError, TypeError) as e:
            raise self.connection.failure(f"no usable key set at /jwks ({e})") from None
        self._fetched = time.monotonic()


def _kid(raw: str) -> str | None:
    """The kid a token *claims*, unverified: only to decide whether fetching the key set again could help."""
    try:
        header = json.loads(base64.urlsafe_b64decode(raw.split(".", 1)[0] + "==="))
        return header.get("kid") if isinstance(header, dict) else None
    except (ValueError, UnicodeDecodeError):
        return None


def _json(content: bytes) -> dict[str, Any]:
    try:
        body = json.loads(content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
