"""A response's head waits for its body (shared/inbound/onewrite.py): what leaves, when, and in what order."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.inbound import HeldHead, OneWriteResponses

pytestmark = pytest.mark.fast


class Wire:
    """A transport that records what is written to it, and its close."""

    def __init__(self) -> None:
        self.sent: list[bytes | str] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.sent.append("close")

    def is_closing(self) -> bool:
        return "close" in self.sent

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default


def test_a_head_and_its_body_leave_in_one_write() -> None:
    async def respond() -> list[bytes | str]:
        wire = Wire()
        held = HeldHead(wire)  # type: ignore[arg-type]
        held.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert wire.sent == [], "the head waits for its body"
        held.write(b"{}")
        return wire.sent

    assert asyncio.run(respond()) == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


def test_a_head_whose_body_comes_later_leaves_when_the_loop_turns() -> None:
    async def respond() -> list[bytes | str]:
        wire = Wire()
        held = HeldHead(wire)  # type: ignore[arg-type]
        held.write(b"head")
        await asyncio.sleep(0)  # the event loop's turn ends: a streamed body's head is not held back
        assert wire.sent == [b"head"]
        held.write(b"chunk")
        await asyncio.sleep(0)
        return wire.sent

    assert asyncio.run(respond()) == [b"head", b"chunk"]


def test_nothing_overtakes_what_is_held() -> None:
    async def respond() -> list[bytes | str]:
        wire = Wire()
        held = HeldHead(wire)  # type: ignore[arg-type]
        held.write(b"head")
        held.writelines([b"body", b"!"])
        held.write(b"400 for the next request")
        held.close()
        await asyncio.sleep(0)  # the flush scheduled for the last write finds it gone already
        return wire.sent

    assert asyncio.run(respond()) == [b"headbody!", b"400 for the next request", "close"]


def test_everything_else_is_the_transports() -> None:
    wire = Wire()
    assert HeldHead(wire).get_extra_info("peername") == ("127.0.0.1", 50000)  # type: ignore[arg-type]


def test_an_answer_held_when_the_caller_stops_sending_still_leaves(tmp_path: Path) -> None:
    """A caller sends a HEAD request and ends its side of the connection (a FIN; close_notify in TLS). HEAD's
    answer is one write, so held to the end of the loop's turn — the turn that also reads the caller's end of
    stream, after which the transport closes (uvloop's TLS transport writes nothing more). It leaves first."""
    finished = threading.Event()

    async def head(request: Request) -> PlainTextResponse:
        finished.wait(5)  # blocks the loop until the caller's FIN is on its way: both are read in one turn
        return PlainTextResponse("ok")

    class Protocol(OneWriteResponses, HttpToolsProtocol):
        pass

    path = tmp_path / "service.sock"
    app = Starlette(routes=[Route("/", head, methods=["HEAD"])])
    config = uvicorn.Config(app, uds=str(path), http=Protocol, loop="none", lifespan="off", log_level="error")
    server = uvicorn.Server(config)

    def caller() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: service-c\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            finished.set()
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    async def serve() -> bytes:
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            return await asyncio.to_thread(caller)
        finally:
            server.should_exit = True
            await serving

    assert uvloop.run(serve()).startswith(b"HTTP/1.1 200 OK")
