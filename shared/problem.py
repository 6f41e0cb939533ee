"""Errors as RFC 9457 problem documents: machine-readable, and a sentence a person can act on."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mesh.error")

# Problem types are names, not pages: RFC 9457 allows any URI, and a URN promises no web page.
PROBLEM_TYPES = "urn:mtls-mesh:problem:"


class Problem(Exception):
    """Raise it anywhere in a request; the handler below turns it into `application/problem+json`."""

    def __init__(
        self, status: int, kind: str, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail, self.extra = status, kind, title, detail, extra
        self.headers = headers or {}  # e.g. WWW-Authenticate on a 401

    def body(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_TYPES + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


async def problem_response(request: Request, problem: Exception) -> JSONResponse:
    assert isinstance(problem, Problem)
    return JSONResponse(
        problem.body(), status_code=problem.status, media_type="application/problem+json", headers=problem.headers
    )


async def http_error_response(request: Request, error: Exception) -> JSONResponse:
    """404, 405 and friends: the status and its name, nothing about what does exist."""
    assert isinstance(error, StarletteHTTPException)
    title = HTTPStatus(error.status_code).phrase
    problem = Problem(error.status_code, title.lower().replace(" ", "-"), title, title)
    return await problem_response(request, problem)


async def unexpected_error_response(request: Request, error: Exception) -> JSONResponse:
    """A bug: the stack trace goes to the log (with the trace id), never to the caller."""
    log.error("unexpected_error", exc_info=error)
    problem = Problem(500, "internal-error", "Internal error", "The service failed; its log says why.")
    return await problem_response(request, problem)
