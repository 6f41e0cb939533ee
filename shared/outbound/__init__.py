"""Calling the next service: our certificate out, the callee proven to be who we meant, failures explained."""

from __future__ import annotations

from shared.outbound.callee import CalleeCheck, CalleeRefused, callee_check, refuse_unless, sync_transport
from shared.outbound.downstream import (
    KEEPALIVE_EXPIRY,
    MAX_RESPONSE_BYTES,
    Connect,
    Downstream,
    closed_without_answer,
    explain_transport_error,
    refused_at_tls,
)
from shared.outbound.nativetls import NativeTLSBackend, transport
from shared.outbound.pool import HTTPX_MINOR, on_backend

__all__ = [
    "HTTPX_MINOR",
    "KEEPALIVE_EXPIRY",
    "MAX_RESPONSE_BYTES",
    "CalleeCheck",
    "CalleeRefused",
    "Connect",
    "Downstream",
    "NativeTLSBackend",
    "callee_check",
    "closed_without_answer",
    "explain_transport_error",
    "on_backend",
    "refuse_unless",
    "refused_at_tls",
    "sync_transport",
    "transport",
]
