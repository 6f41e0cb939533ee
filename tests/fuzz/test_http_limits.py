"""Fuzzing the HTTP layer of a real service over real TLS: garbage request lines, headers and bodies.

The service is the token service (`python -m services.token_service`), because it has a route that reads a
body (`POST /token`) besides the usual ones; its limits are set small (shared.inbound.RequestLimits:
MESH_MAX_HEADER_BYTES, MESH_MAX_BODY_BYTES, MESH_REQUEST_TIMEOUT) so that the fuzzer crosses them cheaply.
Every request goes over its own mutually authenticated TLS connection, as an allow-listed caller or as one
on no allow-list. Failures: a 5xx, a line at level error (a traceback) in the service's log, a connection
left hanging (neither answered nor closed within the request deadline and a margin), or a dead service.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, example, given, note
from hypothesis import strategies as st

from pki import init
from services.local import ServiceProcess, free_ports, running, token_environment
from shared.layout import Layout
from shared.tokens import TOKEN_SERVICE, USER_GRANT
from tests.fuzz.profiles import examples
from tests.support import Credentials, Service, attacker_context, identity_of

pytestmark = pytest.mark.e2e

REQUEST_TIMEOUT = 1.0  # seconds: MESH_REQUEST_TIMEOUT of the fuzzed service
MARGIN = 3.0  # on top of it, before a silent, open connection counts as hung (a loaded 2-core machine)
MAX_HEADER_BYTES, MAX_BODY_BYTES = 2048, 1024


@dataclass
class Target:
    service: Service
    contexts: dict[str, ssl.SSLContext]  # "allowed": the client, on token-service's allow-list; "stranger": not


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    """The token service with small limits, on a PKI of its own (the limits do not depend on the mode)."""
    with tempfile.TemporaryDirectory() as directory:
        layout = Layout(Path(directory) / "pki")
        init(layout)
        # A comment that, to str.splitlines(), ends at U+0085 and lists the operator (on no list of the token
        # service) on a line of its own: what test_parsers.py found, tried on the real service.
        operator = identity_of(Credentials(layout.cert("operator"), layout.key("operator"))).sha256
        with layout.allow_list(TOKEN_SERVICE).open("a", encoding="utf-8") as allow_list:
            allow_list.write(f"# reviewed by ops\x85{operator}  # operator\n")
        (port,) = free_ports(1)
        environment = token_environment(
            port,
            layout.out,
            MESH_REQUEST_TIMEOUT=str(REQUEST_TIMEOUT),
            MESH_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
            MESH_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        )
        process = ServiceProcess(environment, Path(directory) / "token-service.log", module="services.token_service")
        with running([process]):
            contexts = {
                "allowed": attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client"))),
                "stranger": attacker_context(
                    layout.ca_cert, Credentials(layout.cert("operator"), layout.key("operator"))
                ),
            }
            yield Target(Service(process), contexts)


@dataclass(frozen=True)
class Outcome:
    statuses: list[int]  # of every complete response read
    closed: bool  # the server closed the connection
    seconds: float


RESPONSE_HEAD = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n(.*?)\r\n\r\n", re.S)


def exchange(target: Target, caller: str, payload: bytes) -> Outcome:
    """Send `payload` on a new mTLS connection; read responses until the server closes, or goes quiet after one."""
    start = time.monotonic()
    deadline = start + REQUEST_TIMEOUT + MARGIN
    with socket.create_connection(("127.0.0.1", target.service.port), timeout=MARGIN) as raw:
        connection = target.contexts[caller].wrap_socket(raw, server_hostname=TOKEN_SERVICE)
        with contextlib.suppress(ssl.SSLError, OSError):  # closed while we send (a limit): read what it said
            connection.sendall(payload)
        buffer, statuses, closed, at = b"", [], False, 0
        head_only = payload.startswith(b"HEAD ")  # the answer to HEAD declares a length and sends no body
        while time.monotonic() < deadline:
            # Once a response is in, a quiet connection is a kept-alive one; before that, wait for the deadline.
            connection.settimeout(0.3 if statuses else max(0.05, deadline - time.monotonic()))
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                if statuses:
                    break
                continue
            except (ssl.SSLError, OSError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            buffer += chunk
            while match := RESPONSE_HEAD.match(buffer, at):  # a response counts once its head is in
                statuses.append(int(match.group(1)))
                length = re.search(rb"(?im)^content-length:\s*(\d+)", match.group(2))
                at = match.end() + (int(length.group(1)) if length and not head_only else 0)
        return Outcome(statuses, closed, time.monotonic() - start)


# ── requests ─────────────────────────────────────────────────────────────────────────────────────────────────

FORM = f"grant_type={USER_GRANT}&user=alice&audience=service-a".encode()
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"CONNECT", b"TRACE", b"PRI"])
targets = st.one_of(
    st.sampled_from([b"/token", b"/healthz", b"/jwks", b"/metrics", b"/chain", b"*", b"/token?x=1", b"//token"]),
    st.sampled_from([b"http://token-service/token", b"/%00", b"/%ZZ", b"/../token", b"/" + b"a" * MAX_HEADER_BYTES]),
    st.binary(min_size=1, max_size=20),
)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 ", b"http/1.1", b""])
header_names = st.one_of(
    st.sampled_from(
        [b"Host", b"Content-Length", b"Transfer-Encoding", b"Content-Type", b"Connection", b"Expect",
         b"Authorization", b"Traceparent", b"Upgrade", b"Cookie", b"Content-Encoding", b"Host "]
    ),
    st.binary(max_size=12),
)  # fmt: skip
header_values = st.one_of(
    st.sampled_from(
        [b"token-service", b"0", b"-1", b"1e3", b"99999999999999999999999", b"18446744073709551616", b"5, 5",
         b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"application/x-www-form-urlencoded",
         b"multipart/form-data; boundary=x", b"close", b"keep-alive", b"100-continue", b"Bearer", b"Bearer a.b.c",
         b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01", b"h2c", b"a\r\n b", b"x" * MAX_HEADER_BYTES]
    ),
    st.binary(max_size=24),
)  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A body and the headers that frame it: declared or chunked, true or lying about its length."""
    content = draw(
        st.one_of(
            st.just(FORM),
            st.binary(min_size=1, max_size=64),
            st.builds(lambda junk: FORM + b"&" + junk, st.binary(min_size=1, max_size=16)),
            st.just(b"a" * (MAX_BODY_BYTES + 1)),
        )
    )
    # A lying length costs the request deadline (a second) per example: rarer than the others.
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "bad-chunks", "none", "short-length"]))
    if framing == "length":
        return [(b"Content-Length", str(len(content)).encode())], content
    if framing == "short-length":  # declares more than follows: the request deadline must end it
        return [(b"Content-Length", str(len(content) + 10).encode())], content
    if framing == "chunked":
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (content[:7], content[7:]) if part)
        return [(b"Transfer-Encoding", b"chunked")], chunks + b"0\r\n\r\n"
    if framing == "bad-chunks":
        size = draw(st.sampled_from([b"zz", b"-1", b"ffffffffffffffffff", b"1;" + b"x" * 100, b""]))
        return [(b"Transfer-Encoding", b"chunked")], size + b"\r\n" + content + b"\r\n0\r\n\r\n"
    return [], content


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Mostly a plausible request with one to three parts wrong (so that the limits and the app are reached, not
    only the parser's first check), sometimes a request that is right, now and then bytes that are no request."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=300))
    method, path = draw(st.sampled_from([(b"POST", b"/token"), (b"POST", b"/token"), (b"GET", b"/jwks")]))
    version, separator = b"HTTP/1.1", b"\r\n"
    framing, body = draw(bodies())
    headers = [(b"Host", b"token-service"), (b"Content-Type", b"application/x-www-form-urlencoded"), *framing]
    for change in draw(st.lists(st.sampled_from(WRONGS), max_size=3)):
        if change == "method":
            method = draw(methods)
        elif change == "target":
            path = draw(targets)
        elif change == "version":
            version = draw(versions)
        elif change == "separator":
            separator = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
        elif change == "header":
            headers.insert(draw(st.integers(0, len(headers))), draw(st.tuples(header_names, header_values)))
        elif change == "drop" and headers:
            del headers[draw(st.integers(0, len(headers) - 1))]
        elif change == "big":  # past MESH_MAX_HEADER_BYTES, in one header or in many
            headers += [(b"X-Pad-%d" % i, b"p" * 200) for i in range(MAX_HEADER_BYTES // 200 + 1)]
    head = b" ".join(part for part in (method, path, version) if part) + separator
    head += b"".join(name + b": " + value + separator for name, value in headers)
    return head + separator + body


WRONGS = ["method", "target", "version", "separator", "header", "header", "drop", "big"]


# ── properties ───────────────────────────────────────────────────────────────────────────────────────────────


def assert_healthy_after(target: Target, mark: int, logged: int, outcome: Outcome, payload: bytes) -> None:
    note(f"{payload[:300]!r} → {outcome}")
    event(f"{outcome.statuses or ''} {'closed' if outcome.closed else 'kept alive'}")
    assert all(status < 500 for status in outcome.statuses), f"{outcome.statuses}: a 5xx for {payload[:200]!r}"
    assert outcome.statuses or outcome.closed, (
        f"the connection hung: neither answered nor closed within {REQUEST_TIMEOUT + MARGIN:g} s ({payload[:200]!r})"
    )
    first = outcome.statuses[:1]
    head, complete, _ = payload.partition(b"\r\n\r\n")
    if complete and len(head) > MAX_HEADER_BYTES:
        assert set(first) <= {400, 431}, f"{first}: headers over the limit got through ({len(head)} bytes)"
    declared = re.findall(rb"(?im)^content-length: *(\d+)\r?$", head)
    if complete and len(declared) == 1 and int(declared[0]) > MAX_BODY_BYTES:
        assert set(first) <= {400, 413}, f"{first}: a declared body over the limit got through ({declared[0]!r})"
    target.service.assert_alive()
    errors = [e for e in target.service.events_since(mark) if e.get("level") in ("error", "critical")]
    assert not errors, f"the service logged an error for {payload[:200]!r}: {errors[0]}"
    printed = [line for line in target.service.process.output()[logged:].splitlines() if not line.startswith("{")]
    assert not any("Traceback" in line for line in printed), f"a traceback on the service's output: {printed}"


@examples(30)
@given(requests(), st.sampled_from(["allowed", "allowed", "stranger"]))
@example(
    b"POST /token HTTP/1.1\r\nHost: token-service\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde", "allowed"
)
@example(
    b"POST /token HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n" * 2,
    "allowed",
)
@example(b"HEAD /token HTTP/1.1\r\nHost: token-service\r\nContent-Length: 5\r\n\r\nabcde", "allowed")  # no body back
@example(b"GET /healthz HTTP/1.1\r\nHost: token-service\r\n", "allowed")  # never finished: the deadline ends it
@example(b"GET /jwks HTTP/1.1\r\nHost: token-service\r\nX-Pad: %s\r\n\r\n" % (b"p" * MAX_HEADER_BYTES), "allowed")
@example(b"POST /token HTTP/1.1\r\nHost: token-service\r\nContent-Length: 10\r\n\r\nabc", "stranger")  # nor this
def test_no_request_makes_a_service_fail_hang_or_log_an_error(target: Target, payload: bytes, caller: str) -> None:
    mark, logged = target.service.mark(), len(target.service.process.output())
    assert_healthy_after(target, mark, logged, exchange(target, caller, payload), payload)


def test_a_caller_named_only_inside_a_comment_is_refused(target: Target) -> None:
    """The operator's thumbprint follows a U+0085 inside a comment of allow/token-service.txt: 403, as for anyone
    on no list (before the fix the service admitted it, and answered its POST /token)."""
    request = b"POST /token HTTP/1.1\r\nHost: token-service\r\nContent-Length: %d\r\n\r\n%s" % (len(FORM), FORM)
    mark = target.service.mark()
    assert exchange(target, "stranger", request).statuses == [403]
    denied = target.service.events_since(mark, "authz")
    assert [e["decision"] for e in denied] == ["deny"] and not target.service.events_since(mark, "token_granted")


def test_the_fuzzed_service_still_answers(target: Target) -> None:
    """Also proves the properties above were not vacuous: a well-formed request gets its 200."""
    request = b"POST /token HTTP/1.1\r\nHost: token-service\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    outcome = exchange(target, "allowed", request + b"Content-Length: %d\r\n\r\n%s" % (len(FORM), FORM))
    assert outcome.statuses == [200], outcome
