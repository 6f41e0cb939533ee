"""The token service's signing keys, rolled without failing a request: the next key is published a whole
key lifetime before it signs anything, and a replaced key stays published until its last token has expired.

    keys = SigningKeys(roll_every=3600, token_lifetime=300)
    keys.current()        # the ES256 key to sign with (the next one takes over once this is `roll_every` old)
    keys.jwks()           # {"keys": [...]}: the public halves of the next, current and replaced keys, for GET /jwks
    keys.key_set()        # the same keys, to check a token it is given back (RFC 8693's subject token)

Verifiers (shared.tokens.client) fetch the set at least every minute and when a token names a key they do not
have (one fetch at a time, at most one every few seconds); with `roll_every` above that minute, every verifier
holds a key before the first token it signs.

Keys live in memory only and are never written anywhere: a restarted token service starts with new keys,
and tokens signed before the restart stop verifying (their holders ask again; they live minutes).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from joserfc.jwk import ECKey, KeySet

from shared.tokens import ALGORITHM, LEEWAY_SECONDS

__all__ = ["SigningKeys"]


class SigningKeys:
    def __init__(self, roll_every: float, token_lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self.roll_every, self.token_lifetime, self.clock = roll_every, token_lifetime, clock
        self._current, self._next, self._since = self._new_key(), self._new_key(), clock()
        self._retired: list[tuple[ECKey, float]] = []  # (key, when it stopped signing)

    def current(self) -> ECKey:
        if self.clock() - self._since >= self.roll_every:
            self.roll()
        return self._current

    def roll(self) -> ECKey:
        """The next key signs from now on, a new next key is published, and the old one stays published while
        tokens it signed can still be valid."""
        now = self.clock()
        self._retired.append((self._current, now))
        self._current, self._next, self._since = self._next, self._new_key(), now
        return self._current

    def published(self) -> list[ECKey]:
        """The current key, the next one, then those replaced whose tokens may still be valid, newest first."""
        now = self.clock()
        current = self.current()
        # A token lives at most token_lifetime, and verifiers allow LEEWAY_SECONDS of clock difference.
        keep = self.token_lifetime + LEEWAY_SECONDS
        self._retired = [(key, retired) for key, retired in self._retired if now - retired <= keep]
        return [current, self._next, *(key for key, _ in reversed(self._retired))]

    def key_set(self) -> KeySet:
        return KeySet(self.published())

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**key.as_dict(private=False), "use": "sig", "alg": ALGORITHM} for key in self.published()]}

    def status(self) -> dict[str, Any]:
        """For the operator (GET /status): which key signs, which is next and when it takes over."""
        current = self.current()
        takes_over = dt.datetime.fromtimestamp(self._since + self.roll_every, dt.UTC)
        return {
            "signing_keys": {
                "current": current.kid,
                "next": self._next.kid,
                "next_signs_at": f"{takes_over:%Y-%m-%dT%H:%M:%SZ}",
                "published": [key.kid for key in self.published()],
            }
        }

    @staticmethod
    def _new_key() -> ECKey:
        key = ECKey.generate_key("P-256")
        # kid: the key's RFC 7638 thumbprint, so a kid can never name two different keys.
        return ECKey.import_key(key.as_dict(private=True), {"kid": key.thumbprint(), "use": "sig", "alg": ALGORITHM})
