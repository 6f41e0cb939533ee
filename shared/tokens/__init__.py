"""User tokens: what one is, checking one on every request, and exchanging it before calling on."""

from __future__ import annotations

from shared.tokens.client import (
    CACHE_MARGIN,
    CACHE_SIZE,
    KEYS_MAX_AGE,
    REFETCH_AFTER,
    RETRY_AFTER,
    REUSE_FOR,
    TokenClient,
)
from shared.tokens.onbehalf import OnBehalfOf, token_decisions
from shared.tokens.token import (
    ACCESS_TOKEN_TYPE,
    ALGORITHM,
    EXCHANGE_GRANT,
    LEEWAY_SECONDS,
    MAX_ACTORS,
    TOKEN_SERVICE,
    TYP,
    USER_GRANT,
    TokenRefused,
    UserToken,
    check_holder,
    mint,
    verify,
    x5t_s256,
)

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "ALGORITHM",
    "CACHE_MARGIN",
    "CACHE_SIZE",
    "EXCHANGE_GRANT",
    "KEYS_MAX_AGE",
    "LEEWAY_SECONDS",
    "MAX_ACTORS",
    "REFETCH_AFTER",
    "RETRY_AFTER",
    "REUSE_FOR",
    "TOKEN_SERVICE",
    "TYP",
    "USER_GRANT",
    "OnBehalfOf",
    "TokenClient",
    "TokenRefused",
    "UserToken",
    "check_holder",
    "mint",
    "token_decisions",
    "verify",
    "x5t_s256",
]
