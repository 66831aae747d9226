"""Retention by length and by age, and OUT_OF_RANGE for cursors older than it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import redis.asyncio as redis_asyncio

from activity_events.pb import activityevents_pb2 as pb
from tests.support.streams import RPC_TIMEOUT, create, list_events, stream_status, watch


def events_key(deployment_id: int) -> str:
    return f"ae:{{d:{deployment_id}}}:events"


async def test_max_len_keeps_about_max_len_events(
    app_factory: Any, stub_for: Any, redis_client: redis_asyncio.Redis
) -> None:
    stub = stub_for(await app_factory(retention_max_len=10))
    responses = [await create(stub, 1, i) for i in range(1, 101)]
    stored = int(await redis_client.xlen(events_key(1)))
    assert 10 <= stored <= 11
    listed = await list_events(stub, 1)
    assert len(listed) == stored
    # The newest events are the ones kept, in order.
    assert [e.id for e in listed] == list(range(101 - stored, 101))
    page = await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=RPC_TIMEOUT)
    assert [(d.id, d.event_count) for d in page.deployments] == [(1, stored)]
    # A retry of a trimmed event is still recognised as a duplicate.
    again = await create(stub, 1, 1)
    assert again.success and again.duplicate
    assert again.cursor == responses[0].cursor
    assert int(await redis_client.xlen(events_key(1))) == stored


async def test_cursor_older_than_retention_is_out_of_range(app_factory: Any, stub_for: Any) -> None:
    stub = stub_for(await app_factory(retention_max_len=10))
    responses = [await create(stub, 1, i) for i in range(1, 101)]
    error = await stream_status(
        stub.WatchEvents(
            pb.WatchEventsRequest(deployment_id=1, after=responses[0].cursor), timeout=RPC_TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    # Following from it fails the same way rather than silently skipping.
    error = await stream_status(
        stub.WatchEvents(
            pb.WatchEventsRequest(deployment_id=1, after=responses[0].cursor, follow=True),
            timeout=RPC_TIMEOUT,
        )
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    # A recent cursor still works and yields exactly the newer events.
    recent = await watch(stub, 1, after=responses[96].cursor)
    assert [s.event.id for s in recent] == [98, 99, 100]
    assert [s.cursor for s in recent] == [r.cursor for r in responses[97:]]
    # Reading from the start is not an error: it starts at the oldest kept event.
    assert len(await watch(stub, 1)) >= 10


async def test_all_deployments_cursor_older_than_retention_is_out_of_range(
    app_factory: Any, stub_for: Any
) -> None:
    stub = stub_for(await app_factory(retention_max_len=5))
    first = await create(stub, 1, 1)
    for i in range(2, 60):
        await create(stub, 1, i)
    error = await stream_status(
        stub.WatchEvents(
            pb.WatchEventsRequest(deployment_id=0, after=first.cursor), timeout=RPC_TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_max_age_drops_old_events_on_next_write(
    app_factory: Any, stub_for: Any, redis_client: redis_asyncio.Redis
) -> None:
    stub = stub_for(await app_factory(retention_max_age_seconds=1))
    old = [await create(stub, 1, i) for i in range(1, 6)]
    await create(stub, 2, 1, "other deployment")
    assert int(await redis_client.xlen(events_key(1))) == 5
    await asyncio.sleep(1.3)
    fresh = await create(stub, 1, 6, "fresh")
    listed = await list_events(stub, 1)
    assert [e.id for e in listed] == [6]
    assert int(await redis_client.xlen(events_key(1))) == 1
    error = await stream_status(
        stub.WatchEvents(
            pb.WatchEventsRequest(deployment_id=1, after=old[1].cursor), timeout=RPC_TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    after_fresh = await watch(stub, 1, after=fresh.cursor)
    assert after_fresh == []
    assert (await create(stub, 1, 2)).duplicate


async def test_retention_off_by_default_keeps_everything(
    stub_for: Any, app_factory: Any, redis_client: redis_asyncio.Redis
) -> None:
    stub = stub_for(await app_factory())
    batch = [pb.EventRequest(deployment_id=1, id=i, message=f"e{i}") for i in range(1, 301)]
    await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)
    assert int(await redis_client.xlen(events_key(1))) == 300
