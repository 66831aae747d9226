"""Small async helpers for talking to the server in tests.

Every network wait here has a deadline: a test that hangs tells nobody
anything, a test that fails with "no event within 5 s" does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

#: Default deadline of one RPC or of reading one whole stream.
RPC_TIMEOUT = 10.0


def now_ns() -> int:
    return time.time_ns()


def event(
    deployment_id: int,
    event_id: int,
    message: str = "",
    *,
    send: int | None = None,
    timestamp: bool = True,
) -> pb.EventRequest:
    """An EventRequest; ``send`` defaults to now, ``timestamp=False`` leaves it unset."""
    request = pb.EventRequest(
        id=event_id, deployment_id=deployment_id, message=message or f"event {event_id}"
    )
    if timestamp:
        request.timestamp.send = now_ns() if send is None else send
    return request


async def create(
    stub: pb_grpc.ActivityEventsStub,
    deployment_id: int,
    event_id: int,
    message: str = "",
    **kwargs: Any,
) -> pb.EventResponse:
    """CreateEvent with a deadline."""
    response: pb.EventResponse = await stub.CreateEvent(
        event(deployment_id, event_id, message, **kwargs), timeout=RPC_TIMEOUT
    )
    return response


async def collect(call: Any, timeout: float = RPC_TIMEOUT) -> list[Any]:
    """All messages of a server stream, which must end within ``timeout`` seconds."""

    async def drain() -> list[Any]:
        return [message async for message in call]

    try:
        return await asyncio.wait_for(drain(), timeout)
    finally:
        call.cancel()


async def list_events(
    stub: pb_grpc.ActivityEventsStub, deployment_id: int, timeout: float = RPC_TIMEOUT
) -> list[pb.EventRequest]:
    """The whole ListEvents stream of a deployment (0: all)."""
    return await collect(stub.ListEvents(pb.Deployment(id=deployment_id), timeout=timeout), timeout)


async def watch(
    stub: pb_grpc.ActivityEventsStub,
    deployment_id: int = 0,
    after: str = "",
    limit: int = 0,
    timeout: float = RPC_TIMEOUT,
) -> list[pb.StoredEvent]:
    """The events of a WatchEvents call without follow (the stream must end)."""
    request = pb.WatchEventsRequest(deployment_id=deployment_id, after=after, limit=limit)
    messages = await collect(stub.WatchEvents(request, timeout=timeout), timeout)
    assert not any(m.caught_up for m in messages), "caught_up sent without follow"
    return [stored for message in messages for stored in message.events]


async def status_of(awaitable: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error an RPC fails with; fails the test if the RPC succeeds."""
    try:
        result = await awaitable
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"expected an RPC error, got {result!r}")


async def stream_status(call: Any, timeout: float = RPC_TIMEOUT) -> grpc.aio.AioRpcError:
    """The error a server stream ends with; fails the test if it ends OK."""
    try:
        messages = await collect(call, timeout)
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"expected the stream to fail, it ended OK after {len(messages)} messages")


async def wait_until(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> None:
    """Poll ``predicate`` (sync or async) until true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s")
        await asyncio.sleep(interval)


class Follower:
    """A WatchEvents call with follow=true, read with a deadline per step.

    ``events`` accumulates every StoredEvent received, ``caught_up`` counts the
    caught-up markers and ``marker_at`` records how many events had arrived
    when the first one came.
    """

    def __init__(
        self,
        stub: pb_grpc.ActivityEventsStub,
        deployment_id: int = 0,
        after: str = "",
        limit: int = 0,
    ) -> None:
        request = pb.WatchEventsRequest(
            deployment_id=deployment_id, after=after, limit=limit, follow=True
        )
        self.call = stub.WatchEvents(request)
        self.events: list[pb.StoredEvent] = []
        self.caught_up = 0
        self.marker_at: int | None = None
        self.ended = False

    async def read_one(self, timeout: float) -> pb.WatchEventsResponse | None:
        """The next message, or ``None`` when the stream ended OK. Raises on error or timeout."""
        message = await asyncio.wait_for(self.call.read(), timeout)
        if message is grpc.aio.EOF:
            self.ended = True
            return None
        if message.caught_up:
            self.caught_up += 1
            if self.marker_at is None:
                self.marker_at = len(self.events)
        self.events.extend(message.events)
        return message  # type: ignore[no-any-return]

    async def until_caught_up(self, timeout: float = RPC_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.caught_up:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or await self.read_one(remaining) is None:
                raise AssertionError(f"no caught_up marker within {timeout}s")

    async def until_count(self, count: int, timeout: float = RPC_TIMEOUT) -> list[pb.StoredEvent]:
        """Read until at least ``count`` events arrived in total."""
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {len(self.events)} of {count} events within {timeout}s")
            if await self.read_one(remaining) is None:
                raise AssertionError(f"stream ended after {len(self.events)} of {count} events")
        return self.events

    def cancel(self) -> None:
        self.call.cancel()
