"""Errors as RFC 9457 problem documents: machine-readable, and a sentence a person can act on."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

# Problem types are names, not pages: RFC 9457 allows any URI, and a URN promises no web page.
PROBLEM_TYPES = "urn:mtls-mesh:problem:"


class Problem(Exception):
    """Raise it anywhere in a request; the handler below turns it into `application/problem+json`."""

    def __init__(self, status: int, kind: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail, self.extra = status, kind, title, detail, extra

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
    return JSONResponse(problem.body(), status_code=problem.status, media_type="application/problem+json")
