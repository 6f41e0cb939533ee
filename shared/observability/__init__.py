"""Logs, metrics, recent decisions and trace context: what happened, in the same words in every service."""

from __future__ import annotations

from shared.observability.decisions import Decision, DecisionRing, recent
from shared.observability.log import JSONFormatter, configure
from shared.observability.metrics import Counter, Gauge, exposition
from shared.observability.trace import Span, TraceMiddleware, continue_or_start, current

__all__ = [
    "Counter",
    "Decision",
    "DecisionRing",
    "Gauge",
    "JSONFormatter",
    "Span",
    "TraceMiddleware",
    "configure",
    "continue_or_start",
    "current",
    "exposition",
    "recent",
]
