"""A response's head waits for its body (shared/inbound/onewrite.py): what leaves, when, and in what order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.inbound import HeldHead

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
