"""One JSON object per line, the same field names in every service, so logs can be grepped and joined.

MESH_LOG_FORMAT=text writes the same records for a person instead (`make run` in a terminal):

    12:04:31 WARNING service-b authz decision=deny reason='…' caller_subject='CN=client,O=mtls-mesh'
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any

from shared.observability import trace

# uvicorn adds color_message (the same text with ANSI colours) to its records; a log file wants neither.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JSONFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "event": record.getMessage(),
        }
        span = trace.current.get()
        if span is not None:
            event["trace_id"] = span.trace_id
        event.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info and record.levelno >= logging.ERROR:
            # Stack traces go to the operator's log, never into a response.
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class TextFormatter(JSONFormatter):
    """One line a person reads: time, level, service, event, then the fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        event = json.loads(super().format(record))
        head = f"{event.pop('ts')[11:19]} {event.pop('level').upper():<7} {event.pop('service')} {event.pop('event')}"
        trace = event.pop("exception", None)
        fields = " ".join(
            f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}" for k, v in event.items() if v is not None
        )
        return f"{head} {fields}".rstrip() + (f"\n{trace}" if trace else "")


def configure(service: str, level: str = "info") -> None:
    """Route our loggers and uvicorn's to stdout: JSON lines, or text with MESH_LOG_FORMAT=text."""
    handler = logging.StreamHandler(sys.stdout)
    text = os.environ.get("MESH_LOG_FORMAT", "json").lower() == "text"
    handler.setFormatter(TextFormatter(service) if text else JSONFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our decision log says more, once per request
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO
