"""The last decisions a service made, kept in memory for the operator: who was let in or refused, where, and why.

Counters (shared.observability.metrics) say how often; this says who and when, which is what a person watching
an attack needs (`make view` draws it). Every decision is recorded where it is logged and counted — the TLS
handshake (shared.inbound.handshake), the allow-list (shared.authz.guard) and the user token
(shared.tokens.onbehalf) — so the three layers appear in one ordered feed:

    recent.record("tls", "deny", "certificate has expired", peer="127.0.0.1:51234")
    recent.since(after=0)   # -> (the decisions with seq > 0, oldest first; the next seq to ask for)

Bounded on purpose: a ring of MESH_DECISIONS_KEPT entries (default 200), so that a flood of refused
handshakes costs a fixed amount of memory and pushes out only older entries. An entry holds no token, no
certificate and no header: the layer, the verdict, a short code, the reason the service logs anyway, and the
caller's SPIFFE ID or subject — or, for a refused handshake, where the connection came from (a certificate
that failed verification names nobody we could believe). Services serve it at GET /decisions to the
identities of allow/metrics.txt only (services/app.py): who calls whom is itself worth hiding.

Each entry carries a sequence number that only grows, so a reader asks for what is newer than what it has
(`?after=`) and sees from a gap in the numbers that the ring overflowed between two reads.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

from shared.x509.identity import PeerIdentity

__all__ = ["Decision", "DecisionRing", "recent", "tls_code", "token_code"]

Layer = Literal["tls", "allow-list", "token"]


@dataclass(frozen=True)
class Decision:
    seq: int
    time: float  # seconds since the epoch
    layer: Layer
    verdict: Literal["allow", "deny"]
    code: str  # short and stable, for counting: "expired", "unknown_ca", "not_listed", "audience", …
    reason: str  # the sentence the service logs
    caller: str | None  # SPIFFE ID (or subject) of a verified caller; None when the handshake was refused
    peer: str | None = None  # host:port, for refused handshakes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DecisionRing:
    """The newest `size` decisions, oldest first. Not thread-safe: the event loop is its only writer."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"MESH_DECISIONS_KEPT must be at least 1, not {size}")
        self.size = size
        self._entries: deque[Decision] = deque(maxlen=size)
        self._seq = 0

    def record(
        self,
        layer: Layer,
        verdict: Literal["allow", "deny"],
        reason: str,
        code: str | None = None,
        caller: PeerIdentity | None = None,
        peer: str | None = None,
    ) -> None:
        if code is None:
            code = tls_code(reason) if layer == "tls" else token_code(reason) if layer == "token" else "other"
        self._seq += 1
        name = (caller.spiffe_id or caller.subject) if caller else None
        self._entries.append(Decision(self._seq, time.time(), layer, verdict, code, reason, name, peer))

    def since(self, after: int = 0) -> tuple[list[Decision], int]:
        """The decisions numbered above `after`, oldest first, and the number to pass as `after` next time."""
        return [d for d in self._entries if d.seq > after], self._seq


# OpenSSL's verify messages (and LiveTLS.refusal's sentences) → the codes a person recognises. Anything else is
# counted as "other" and shown with its own sentence.
_TLS_CODES = (
    ("did not return a certificate", "no_certificate"),
    ("unable to get local issuer", "unknown_ca"),
    ("self-signed certificate", "unknown_ca"),
    ("self signed certificate", "unknown_ca"),
    ("no longer trusted", "unknown_ca"),
    ("unknown ca", "unknown_ca"),
    ("has expired", "expired"),
    ("not yet valid", "not_yet_valid"),
    ("revoked", "revoked"),
    ("unsupported certificate purpose", "wrong_purpose"),
    ("unsupported protocol", "old_tls"),
    ("crl has expired", "crl_expired"),
)

# shared.tokens' refusal sentences (token.py, onbehalf.py) → codes (first match wins: "expired" before "scope").
_TOKEN_CODES = (
    ("none was sent", "missing"),
    ("not `bearer", "missing"),
    ("expired", "expired"),
    ("is for ", "audience"),
    ("(aud)", "audience"),
    ("cnf", "cnf"),
    ("bound to", "cnf"),
    ("holder", "cnf"),
    ("scope", "scope"),
    ("signature", "signature"),
    ("signing key", "signature"),
)


def tls_code(reason: str) -> str:
    lowered = reason.lower().replace("_", " ")  # OpenSSL's reasons come as PEER_DID_NOT_RETURN_A_CERTIFICATE
    if "crl has expired" in lowered:
        return "crl_expired"
    return next((code for words, code in _TLS_CODES if words in lowered), "other")


def token_code(reason: str) -> str:
    lowered = reason.lower()
    return next((code for words, code in _TOKEN_CODES if words in lowered), "invalid")


def _kept() -> int:
    value = os.environ.get("MESH_DECISIONS_KEPT", "200")
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"MESH_DECISIONS_KEPT={value!r}: give how many recent decisions to keep, a whole number ≥ 1")
    return int(value)


recent = DecisionRing(_kept())
