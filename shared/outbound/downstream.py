"""Calling the next service: our own certificate out, the callee's identity checked, failures explained.

One httpx transport — httpx's connection pool — per service, made when the service starts and reused for every
request, so the mutual handshake happens once per connection and keep-alive requests skip it.

We send on the transport, not through an `httpx.AsyncClient`: a call to the next hop follows no redirects, sends no
auth and must keep no cookies (a cookie set during one user's call would ride along on the next user's), and the
client's machinery for those would run on every call (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.authz.rules import authorize_id
from shared.observability import trace
from shared.outbound import nativetls
from shared.outbound.callee import CalleeCheck, CalleeRefused, callee_check
from shared.problem import Problem, echo
from shared.tls.live import Recheck
from shared.x509.spiffe import SpiffeId

# uvicorn closes idle connections after 5 s. Dropping ours sooner means we never send a request on a
# connection the server is closing at that moment (which would fail with "server disconnected").
KEEPALIVE_EXPIRY = 4.0
# A hop's answer is a few KB of JSON. A callee that sends more is broken or hostile, and what it sends would be
# held in our memory: we stop reading at this bound (the connection is dropped) and answer 502.
MAX_RESPONSE_BYTES = 1 << 20

# How a Downstream gets its transport: `nativetls.transport` in a service; an httpx.MockTransport in a test.
Connect = Callable[[ssl.SSLContext, httpx.Limits, CalleeCheck], httpx.AsyncBaseTransport]

log = logging.getLogger("mesh.downstream")
_KINDS = {
    502: ("downstream-failed", "Downstream call failed"),
    504: ("downstream-timeout", "Downstream call timed out"),
}


class Downstream:
    """The service we call next, reached at `url` and required to prove it is `name`."""

    def __init__(
        self,
        caller: str,
        name: str,
        url: str,
        context: ssl.SSLContext,
        timeout: float,
        expected_id: SpiffeId,
        *,
        keepalive: bool = True,
        recheck: Recheck | None = None,
        connect: Connect = nativetls.transport,
    ) -> None:
        self.caller, self.name, self.url, self.timeout = caller, name, url.rstrip("/"), timeout
        self.keepalive = keepalive
        self.context = context
        # Who must answer: the DNS name `name` (TLS checks it) and, after the handshake, this SPIFFE ID...
        self.expected_id = expected_id
        # ...and, with `recheck` (LiveTLS.recheck), still trusted when the handshake completes: a pool renewed
        # after a trust change can still finish a handshake begun with the old context.
        self.check = callee_check(authorize_id(self.expected_id), recheck)
        self.connect = connect  # the transport's maker: the event loop's TLS, or a test's httpx.MockTransport
        self.transport = self._new_transport()
        self._timeouts = httpx.Timeout(timeout).as_dict()  # what an AsyncClient would put in each request
        self._retiring: set[asyncio.Task[None]] = set()

    def _new_transport(self) -> httpx.AsyncBaseTransport:
        keepalive = 20 if self.keepalive else 0  # 20: httpx's default
        limits = httpx.Limits(max_keepalive_connections=keepalive, keepalive_expiry=KEEPALIVE_EXPIRY)
        return self.connect(self.context, limits, self.check)

    def renew(self, context: ssl.SSLContext) -> None:
        """New connections from now on, with `context` (the TLS material changed); the old pool closes once
        in-flight calls end: its connections were checked under the old material — a callee since revoked,
        a CA since removed."""
        self.context = context
        old, self.transport = self.transport, self._new_transport()

        async def retire() -> None:
            try:
                await asyncio.sleep(self.timeout + 1)  # no in-flight request outlives its timeout
            finally:
                await old.aclose()  # also when the service stops first: aclose() cancels this task

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def get_json(self, path: str, headers: dict[str, str] | None = None) -> Any:
        """GET `path` on the callee and return its JSON; any failure becomes a 502 (504 on timeout) naming this hop."""
        response = await self.send("GET", path, headers=headers)
        if response.status_code == 200:
            try:
                return response.json()
            except ValueError:
                raise self.failure(f"{self.name} answered HTTP 200 with a body that is not JSON") from None
        problem = _problem_body(response)
        if response.status_code in (502, 504) and "hop" in problem:
            # A hop further down failed: pass its account up unchanged, so the client learns where.
            raise Problem(
                response.status_code,
                *_KINDS[response.status_code],
                problem.get("detail", ""),
                service=self.caller,
                hop=problem["hop"],
                reason=problem.get("reason", ""),
            )
        if response.status_code in (401, 403):
            reason = (
                f"{self.name} refused {self.caller}: {problem.get('reason') or problem.get('detail') or 'forbidden'}"
            )
        else:
            reason = f"{self.name} answered HTTP {response.status_code}"
        raise self.failure(reason)

    async def send(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, data: dict[str, str] | None = None
    ) -> httpx.Response:
        """One request to the callee, with the trace passed on; a failure to get any answer, or an answer over
        MAX_RESPONSE_BYTES, becomes a 502 (504 on timeout) naming this hop. What an answer means is the caller's
        to decide."""
        span = trace.current.get()
        headers = {
            **(headers or {}),
            **({"traceparent": span.child().traceparent()} if span else {}),
            # Uncompressed only: a few KB of gzip can inflate to gigabytes in one chunk, past any bound we count.
            "Accept-Encoding": "identity",
        }
        request = httpx.Request(
            method,
            self.url + path,
            headers=headers,
            data=data,
            # The TLS server name, and so the name the callee's certificate must carry, is the service's
            # name, whatever address we dial. Locally every leaf also carries 127.0.0.1 and localhost,
            # so checking the dialled address alone could not tell service-b from service-c.
            extensions={"sni_hostname": self.name, "timeout": self._timeouts},
        )
        try:
            # One deadline for the whole answer: httpx's timeouts are per read, and a callee that sends a byte
            # now and then would hold this call (and the request that made it) for as long as it liked.
            async with asyncio.timeout(self.timeout):
                response = await self.transport.handle_async_request(request)
                try:
                    content = await self._bounded(response)
                except BaseException:
                    # Unread, the rest is never received: the connection is cut at once. A goodbye (TLS close_notify)
                    # would have the transport wait for the callee's, reading whatever it still sends.
                    _cut(response)
                    raise
                finally:
                    await response.aclose()
        except TimeoutError:
            raise self.failure(no_answer_within(self.name, self.timeout), 504) from None
        except httpx.HTTPError as e:
            # The reason travels up to the edge: it names the hop, never an address inside the mesh. The log
            # keeps the address and httpx's own words for the operator.
            reason = explain_transport_error(e, self.name, self.timeout)
            error = f"{type(e).__name__}: {e}"
            log.warning("downstream_error", extra={"hop": self.hop, "url": self.url, "error": error})
            raise self.failure(reason, 504 if isinstance(e, httpx.TimeoutException) else 502) from None
        return httpx.Response(response.status_code, headers=response.headers, content=content, request=request)

    async def _bounded(self, response: httpx.Response) -> bytes:
        """The body of `response`, read as it arrives and refused (502) once it passes MAX_RESPONSE_BYTES."""
        encoding = response.headers.get("content-encoding", "identity")
        if encoding.lower() != "identity":
            raise self.failure(f"{self.name} answered with Content-Encoding {echo(encoding)}, which we did not accept")
        too_big = f"{self.name} answered with more than {MAX_RESPONSE_BYTES} bytes (a hop's answer is a few KB)"
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise self.failure(too_big)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                raise self.failure(too_big)
        return bytes(body)

    @property
    def hop(self) -> str:
        """How problems and logs name this call: "service-a → service-b"."""
        return f"{self.caller} → {self.name}"

    def failure(self, reason: str, status: int = 502) -> Problem:
        """The problem document that says this hop failed, and why."""
        hop = self.hop
        log.warning("downstream_failed", extra={"hop": hop, "reason": reason})
        return Problem(
            status,
            *_KINDS[status],
            f"{self.caller} could not call {self.name} ({hop}): {reason}",
            service=self.caller,
            hop=hop,
            reason=reason,
        )

    async def aclose(self) -> None:
        """Close the current pool and every retiring one."""
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await self.transport.aclose()


def no_answer_within(name: str, timeout: float) -> str:
    """What a call that ran out of time is told, whichever deadline ran out: httpx's per read, or ours per call."""
    return f"{name} did not answer within {timeout:g} s"


def explain_transport_error(error: httpx.HTTPError, name: str, timeout: float, url: str | None = None) -> str:
    """Turn what httpx raised into what probably happened. Shared by the services and the CLI client.

    Only the CLI passes `url` (the user's own): a service's explanation goes back to its caller, and the
    addresses inside the mesh are nobody's business outside it.
    """
    text = str(error)
    server = f"the server at {url}" if url else f"the server answering as {name}"
    if isinstance(error, httpx.TimeoutException):
        return no_answer_within(name, timeout)
    if (detail := _failed_our_check(error)) is not None:
        return f"{server} failed our check that it is {name}: {detail}"
    if any(isinstance(cause, socket.gaierror) for cause in _causes(error)):
        host = urlsplit(url).hostname if url else name
        return f"the name {host} does not resolve (DNS): check it" + (f" in {url}" if url else "")
    if any(isinstance(cause, ConnectionRefusedError) for cause in _causes(error)):
        return f"nothing accepts connections at {url} (is {name} running?)" if url else f"{name} is not reachable"
    if any(marker in text for marker in _NOT_TLS):
        return f"{server} does not speak TLS (plain HTTP?): is it the right port, and is it {name}?"
    if closed_without_answer(error):
        # uvicorn (asyncio) refuses a client certificate by closing the connection without a TLS alert; with
        # TLS 1.3 the client only notices on its first read. So "closed without answering" is the signature
        # of a refusal at the TLS layer.
        return (
            f"{name} closed the connection without answering: it refused our client certificate at the TLS layer "
            "(none presented, not signed by a CA it trusts, expired or not yet valid, revoked, or not for client use)"
        )
    return f"{name} could not be called ({type(error).__name__})" if not url else f"{type(error).__name__}: {text}"


# What OpenSSL says when the answer to our ClientHello is not TLS at all: a plain HTTP server's "HTTP/1.1 400".
_NOT_TLS = ("WRONG_VERSION_NUMBER", "record layer failure", "PACKET_LENGTH_TOO_LONG")


def refused_at_tls(error: httpx.HTTPError) -> bool:
    """One end refused the other's certificate — the server closed without answering, or failed our check —
    rather than a call that never got that far (a name that does not resolve, nobody listening, a timeout)."""
    return closed_without_answer(error) or _failed_our_check(error) is not None


def _failed_our_check(error: httpx.HTTPError) -> str | None:
    """Why the server is not who we meant to call (its chain, its name, our callee check), or None."""
    if refused := next((c for c in _causes(error) if isinstance(c, CalleeRefused)), None):
        return str(refused)
    if "CERTIFICATE_VERIFY_FAILED" in (text := str(error)):
        return text.split("certificate verify failed:", 1)[-1].split("(_ssl.c")[0].strip(" .")
    return None


def closed_without_answer(error: httpx.HTTPError) -> bool:
    """The server took the connection and closed it without an answer: how it refuses a client certificate.
    Not a failed name lookup, a refused connection, a timeout or a server that is no TLS server."""
    causes = _causes(error)
    return (
        isinstance(error, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError)
        and not any(isinstance(cause, socket.gaierror | ConnectionRefusedError) for cause in causes)
        and not any(marker in str(error) for marker in (*_NOT_TLS, "CERTIFICATE_VERIFY_FAILED"))
    )


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _problem_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _cut(response: httpx.Response) -> None:
    """Abort the connection `response` came on (nativetls streams can; an in-process transport has none), unless
    the response was read to its end and closed: then the connection is back in its pool, maybe another call's."""
    stream = response.extensions.get("network_stream")
    if isinstance(stream, nativetls.Stream) and not response.is_closed:
        stream.abort()
