"""Raw garbage on the gRPC port neither crashes nor wedges the server.

Each case opens plain TCP connections and writes bytes no gRPC client would
(random noise, a truncated or lying HTTP/2 frame, an HTTP/1.1 request, a TLS
hello on the plaintext port, a connection that goes silent mid-frame). The
server must still answer a normal call and report SERVING afterwards, and
while a silent connection is held open.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

TIMEOUT = 5.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface every HTTP/2 connection starts with."""


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    """An HTTP/2 frame; ``length`` may lie about the payload's size."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


EMPTY_SETTINGS = frame(0x4, 0, 0, b"")
GARBAGE: dict[str, bytes] = {
    "random noise": random.Random(7).randbytes(4096),
    "zeros": bytes(1024),
    "preface only, cut": PREFACE[:10],
    "truncated frame header": PREFACE + EMPTY_SETTINGS + b"\x00\x00",
    "frame longer than sent": PREFACE + EMPTY_SETTINGS + frame(0x1, 0x4, 1, b"\x82", 16_000),
    "frame over max size": PREFACE + EMPTY_SETTINGS + frame(0x0, 0x1, 1, b"x" * 64, 0xFFFFFF),
    "headers on stream 0": PREFACE + EMPTY_SETTINGS + frame(0x1, 0x5, 0, b"\x82\x86\x84"),
    "bad hpack": PREFACE + EMPTY_SETTINGS + frame(0x1, 0x5, 1, b"\xff" * 32),
    "data before headers": PREFACE + EMPTY_SETTINGS + frame(0x0, 0x1, 1, b"\x00\x00\x00\x00\x05"),
    "unknown frame type": PREFACE + EMPTY_SETTINGS + frame(0xEE, 0xFF, 3, b"?" * 100),
    "settings with odd length": PREFACE + frame(0x4, 0, 0, b"\x00\x03\x00"),
    "window update of zero": PREFACE + EMPTY_SETTINGS + frame(0x8, 0, 0, b"\x00\x00\x00\x00"),
    "http/1.1 request": (
        b"GET /activityevents.ActivityEvents/ListEvents HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
    "http/1.1 upgrade": (
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    ),
    "tls client hello": bytes.fromhex("160301002d0100002903035a") + bytes(40),
}


async def send_raw(port: int, data: bytes, *, linger: float = 0.2) -> bytes:
    """Write ``data`` on a fresh TCP connection, read what comes back for ``linger`` s, close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    received = b""
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(linger):
                while chunk := await reader.read(65536):
                    received += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT)
    return received


async def assert_works(app: Any, channel_factory: Callable[..., grpc.aio.Channel], n: int) -> None:
    channel = channel_factory(app.port)
    stub = pb_grpc.ActivityEventsStub(channel)
    response = await stub.CreateEvent(
        pb.EventRequest(id=n, deployment_id=1, message=f"after garbage {n}"), timeout=TIMEOUT
    )
    assert response.success and not response.duplicate
    health = health_pb2_grpc.HealthStub(channel)
    status = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", sorted(GARBAGE))
async def test_garbage_then_a_normal_call(
    server: Any, channel_factory: Callable[..., grpc.aio.Channel], name: str
) -> None:
    await send_raw(server.port, GARBAGE[name])
    await assert_works(server, channel_factory, 1)


async def test_http1_request_gets_no_crash_and_no_data(server: Any) -> None:
    """A plain HTTP/1.1 client is turned away (grpc answers nothing useful or an error)."""
    answer = await send_raw(server.port, GARBAGE["http/1.1 request"], linger=1.0)
    assert b"activityevents" not in answer


async def test_many_garbage_connections_at_once(
    server: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    payloads = list(GARBAGE.values()) * 15
    results = await asyncio.gather(
        *(send_raw(server.port, data, linger=0.1) for data in payloads), return_exceptions=True
    )
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, OSError)]
    assert not unexpected, unexpected[:3]
    await assert_works(server, channel_factory, 2)


async def test_silent_connections_do_not_block_others(
    server: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """Connections that stop mid-preface or mid-frame and stay open: others are served meanwhile."""
    held: list[asyncio.StreamWriter] = []
    try:
        for data in (
            PREFACE[:5],
            PREFACE + EMPTY_SETTINGS + frame(0x1, 0x4, 1, b"\x82", 500)[:12],
            b"GET / HTTP/1.1\r\nHost:",
        ):
            for _ in range(20):
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", server.port), TIMEOUT
                )
                writer.write(data)
                await writer.drain()
                held.append(writer)
        for n in range(3, 8):
            await assert_works(server, channel_factory, n)
    finally:
        for writer in held:
            writer.close()
    await assert_works(server, channel_factory, 8)


async def test_random_fragments_fuzz(
    server: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """Bounded random mixes of a valid preface and noise, then the server still serves."""
    rng = random.Random(1234)
    for _ in range(60):
        parts = [PREFACE if rng.random() < 0.6 else b""]
        for _ in range(rng.randint(0, 4)):
            payload = rng.randbytes(rng.randint(0, 64))
            length = rng.choice([None, rng.randint(0, (1 << 24) - 1)])
            parts.append(
                frame(rng.randint(0, 12), rng.randint(0, 255), rng.randint(0, 9), payload, length)
            )
        data = b"".join(parts)
        data = data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data
        await send_raw(server.port, data, linger=0.02)
    await assert_works(server, channel_factory, 9)
