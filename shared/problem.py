"""Errors as RFC 9457 problem documents: machine-readable, and a sentence a person can act on.

Each layer has its own exception, which knows nothing of HTTP; only the edge of a request turns one into a
`Problem`, and only there is a status chosen:

- files and certificates (shared.x509, shared.tls): `MaterialError` (and `InvalidSpiffeId`, `InvalidSvid` when
  parsing) — never HTTP: a service refuses to start, or keeps its old files; the CLIs exit 2.
- authorization (shared.authz): no exception, a `Decision` — `Guard` answers 401 (no certificate) or 403.
- user tokens (shared.tokens): `TokenRefused`, with RFC 6750's code — `OnBehalfOf` answers 401, or 403 for
  insufficient_scope.
- the token service's policy (services.token_policy): `GrantRefused`, with RFC 6749's code — `POST /token`
  answers 400, or 401 for invalid_client.
- calling on (shared.outbound): `CalleeRefused` — `Downstream` answers 502 naming the hop (504 on a timeout).
- the PKI tool, the client, a service starting: `PKIError`, `CannotAct`, `CannotStart` — an exit code and the
  sentence.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("mesh.error")

# Problem types are names, not pages: RFC 9457 allows any URI, and a URN promises no web page.
PROBLEM_TYPES = "urn:mtls-mesh:problem:"
ECHO_LIMIT = 200  # characters of a caller's input that a refusal or a log line may repeat


def echo(value: object, *, quote: bool = True) -> str:
    """What a refusal may repeat of something a caller sent: its repr (or, `quote=False`, the text itself), cut
    at ECHO_LIMIT characters and saying how long it was. Repeating 64 KB of input in every answer and log line
    would hand any caller the operator's log to fill.

        echo("bob") == "'bob'"        echo("x" * 60_000) == "'xxx…x'… (60000 characters)"
    """
    if isinstance(value, str):
        cut = value[:ECHO_LIMIT]
        shown = repr(cut) if quote else cut
        return shown if len(value) <= ECHO_LIMIT else f"{shown}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]}… ({len(text)} characters)"


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


async def client_disconnected_response(request: Request, error: Exception) -> JSONResponse:
    """The caller hung up before its request body was complete: its own doing, so one INFO line and no stack
    trace (two ERROR tracebacks per cut-off request would let any caller flood the log). The 400 reaches
    nobody when the connection is gone; it is there for a caller that only stopped sending."""
    assert isinstance(error, ClientDisconnect)
    log.info("client_disconnected", extra={"path": echo(request.url.path, quote=False), "method": request.method})
    problem = Problem(400, "incomplete-request", "Incomplete request", "The request body ended before its length.")
    return await problem_response(request, problem)


async def unexpected_error_response(request: Request, error: Exception) -> JSONResponse:
    """A bug: the stack trace goes to the log (with the trace id), never to the caller."""
    log.error("unexpected_error", exc_info=error)
    problem = Problem(500, "internal-error", "Internal error", "The service failed; its log says why.")
    return await problem_response(request, problem)


# How each failure becomes an answer, for FastAPI(exception_handlers=…). Every class but Exception is answered where
# it is raised; Exception (a bug) is answered last, and Starlette then re-raises it so that uvicorn logs it too.
EXCEPTION_HANDLERS = {
    Problem: problem_response,
    StarletteHTTPException: http_error_response,
    ClientDisconnect: client_disconnected_response,
    Exception: unexpected_error_response,
}
