"""History: ListEvents and WatchEvents without follow, cursors, limits and paging."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.streams import (
    RPC_TIMEOUT,
    Follower,
    collect,
    create,
    event,
    list_events,
    stream_status,
    watch,
)


async def create_many(
    stub: pb_grpc.ActivityEventsStub, deployment_id: int, count: int, first_id: int = 1
) -> list[pb.EventResponse]:
    """``count`` events with consecutive ids, in one batch (arrival order = request order)."""
    batch = [
        event(deployment_id, i, f"d{deployment_id} e{i}") for i in range(first_id, first_id + count)
    ]
    response = await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)
    assert all(r.outcome == pb.OUTCOME_CREATED for r in response.results)
    return [pb.EventResponse(id=r.id, success=True, cursor=r.cursor) for r in response.results]


def cursor_key(cursor: str) -> tuple[int, int, int]:
    """A full cursor as (ms, seq, deployment): the merged arrival order."""
    deployment, _, entry = cursor.partition(":")
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq), int(deployment)


async def test_history_order_within_a_deployment(stub: pb_grpc.ActivityEventsStub) -> None:
    ids = [5, 3, 9, 1, 7, 2]
    responses = [await create(stub, 1, i, f"e{i}") for i in ids]
    listed = await list_events(stub, 1)
    assert [e.id for e in listed] == ids
    receives = [e.timestamp.receive for e in listed]
    assert receives == sorted(receives)
    watched = await watch(stub, 1)
    assert [s.event.id for s in watched] == ids
    assert [s.cursor for s in watched] == [r.cursor for r in responses]
    assert all(s.event.timestamp.receive > 0 for s in watched)


async def test_list_all_deployments_in_arrival_order(stub: pb_grpc.ActivityEventsStub) -> None:
    order = []
    for round_ in range(1, 6):
        for deployment_id in (3, 1, 2):
            await create(stub, deployment_id, round_, f"d{deployment_id} r{round_}")
            order.append((deployment_id, round_))
            # Entry ids are milliseconds, ties broken by deployment id: keep creations
            # apart so that arrival order is creation order.
            await asyncio.sleep(0.003)
    listed = await list_events(stub, 0)
    assert [(e.deployment_id, e.id) for e in listed] == order
    watched = await watch(stub, 0)
    assert [(s.event.deployment_id, s.event.id) for s in watched] == order
    cursors = [s.cursor for s in watched]
    assert sorted(cursors, key=cursor_key) == cursors
    assert all(s.cursor.startswith(f"{s.event.deployment_id}:") for s in watched)


async def test_unknown_deployment_is_empty(stub: pb_grpc.ActivityEventsStub) -> None:
    await create(stub, 1, 1)
    assert await list_events(stub, 999) == []
    assert await watch(stub, 999) == []


async def test_empty_store_lists_nothing(stub: pb_grpc.ActivityEventsStub) -> None:
    assert await list_events(stub, 0) == []
    assert await watch(stub, 0) == []


async def test_negative_ids_and_limits_are_invalid(stub: pb_grpc.ActivityEventsStub) -> None:
    error = await stream_status(stub.ListEvents(pb.Deployment(id=-1), timeout=RPC_TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await stream_status(
        stub.WatchEvents(pb.WatchEventsRequest(deployment_id=-1), timeout=RPC_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deployment_id" in (error.details() or "")
    error = await stream_status(
        stub.WatchEvents(pb.WatchEventsRequest(deployment_id=1, limit=-1), timeout=RPC_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit" in (error.details() or "")


async def xrange_calls(redis_client: redis_asyncio.Redis) -> int:
    stats = await redis_client.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


async def test_paging_reads_everything_in_order(
    app_factory: Any, stub_for: Any, redis_client: redis_asyncio.Redis
) -> None:
    stub = stub_for(await app_factory(page_size=7))
    for deployment_id in (1, 2):
        await create_many(stub, deployment_id, 50)
    before = await xrange_calls(redis_client)
    listed = await list_events(stub, 1)
    assert [e.id for e in listed] == list(range(1, 51))
    # Read page by page from Redis (50 events in pages of 7), never all at once.
    assert await xrange_calls(redis_client) - before >= 8
    watched = await watch(stub, 1)
    assert [s.event.id for s in watched] == list(range(1, 51))
    merged = await list_events(stub, 0)
    assert [(e.deployment_id, e.id) for e in merged] == [(1, i) for i in range(1, 51)] + [
        (2, i) for i in range(1, 51)
    ]
    watched_all = await watch(stub, 0)
    assert len(watched_all) == 100
    assert len({s.cursor for s in watched_all}) == 100


async def test_watch_delivers_many_events_per_message(stub: pb_grpc.ActivityEventsStub) -> None:
    await create_many(stub, 1, 40)
    messages = await collect(
        stub.WatchEvents(pb.WatchEventsRequest(deployment_id=1), timeout=RPC_TIMEOUT)
    )
    assert sum(len(m.events) for m in messages) == 40
    assert len(messages) < 40


async def test_watch_messages_fit_a_default_client(stub: pb_grpc.ActivityEventsStub) -> None:
    """Many events per message, but never a message over gRPC's default 4 MiB receive limit.

    Events may be up to max_message_bytes (64 KiB) each, so a page of
    page_size (500) large events would be ~32 MiB if packed into one message.
    """
    payload = "y" * 60_000
    for start in range(1, 151, 30):
        batch = [event(1, i, f"{i} {payload}") for i in range(start, start + 30)]
        await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)
    watched = await watch(stub, 1)
    assert [s.event.id for s in watched] == list(range(1, 151))
    merged = await watch(stub, 0)
    assert len(merged) == 150
    follower = Follower(stub, 1)
    try:
        await follower.until_caught_up()
        assert len(follower.events) == 150
    finally:
        follower.cancel()


async def test_limit(stub: pb_grpc.ActivityEventsStub) -> None:
    responses = await create_many(stub, 1, 50)
    first = await watch(stub, 1, limit=5)
    assert [s.event.id for s in first] == [1, 2, 3, 4, 5]
    after = await watch(stub, 1, after=first[-1].cursor, limit=5)
    assert [s.event.id for s in after] == [6, 7, 8, 9, 10]
    assert [s.cursor for s in after] == [r.cursor for r in responses[5:10]]
    assert len(await watch(stub, 1, limit=500)) == 50
    # With follow, the limit still ends the stream.
    messages = await collect(
        stub.WatchEvents(
            pb.WatchEventsRequest(deployment_id=1, limit=3, follow=True), timeout=RPC_TIMEOUT
        ),
        timeout=5,
    )
    assert [s.event.id for m in messages for s in m.events] == [1, 2, 3]


async def test_after_cursor_full_and_bare(stub: pb_grpc.ActivityEventsStub) -> None:
    responses = await create_many(stub, 4, 20)
    tenth = responses[9].cursor
    assert [s.event.id for s in await watch(stub, 4, after=tenth)] == list(range(11, 21))
    bare = tenth.split(":", 1)[1]
    assert [s.event.id for s in await watch(stub, 4, after=bare)] == list(range(11, 21))
    assert await watch(stub, 4, after=responses[-1].cursor) == []
    # The smallest cursor means "from the start"; one from the future yields nothing yet.
    assert len(await watch(stub, 4, after="4:0-0")) == 20
    assert len(await watch(stub, 4, after="0-1")) == 20
    assert await watch(stub, 4, after="4:99999999999999-0") == []


async def test_resume_has_no_gap_and_no_repeat_while_writing(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    writing_done = asyncio.Event()

    async def writer() -> None:
        try:
            for i in range(1, 301):
                await create(stub, 8, i, f"e{i}")
                if i % 10 == 0:
                    await asyncio.sleep(0.001)
        finally:
            writing_done.set()

    task = asyncio.create_task(writer())
    seen: list[pb.StoredEvent] = []
    after = ""
    try:
        for _ in range(2000):  # bounded: 300 events in chunks of 17 need far fewer rounds
            writer_finished = writing_done.is_set()
            chunk = await watch(stub, 8, after=after, limit=17)
            assert len(chunk) <= 17
            seen.extend(chunk)
            if chunk:
                after = chunk[-1].cursor
            elif writer_finished:
                break
            else:
                await asyncio.sleep(0.005)
        else:
            raise AssertionError("reader did not finish")
    finally:
        await asyncio.wait_for(task, 30)
    stored = await watch(stub, 8)
    assert len(stored) == 300
    assert [s.cursor for s in seen] == [s.cursor for s in stored]
    assert [s.event.id for s in seen] == list(range(1, 301))


@pytest.mark.parametrize(
    "after",
    [
        "abc",
        "1:",
        "1:abc",
        ":1-0",
        "1:1-",
        "1:-1",
        "1:1-0-0",
        "1:2:3-0",
        "x:1-0",
        "1:1.5-0",
        "1:18446744073709551616-0",
        "-5:1-0",
    ],
)
async def test_malformed_cursor(stub: pb_grpc.ActivityEventsStub, after: str) -> None:
    await create(stub, 1, 1)
    error = await stream_status(
        stub.WatchEvents(pb.WatchEventsRequest(deployment_id=1, after=after), timeout=RPC_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, after
    assert "after" in (error.details() or "")


async def test_cursor_of_another_deployment_is_invalid(stub: pb_grpc.ActivityEventsStub) -> None:
    other = await create(stub, 2, 1)
    await create(stub, 1, 1)
    error = await stream_status(
        stub.WatchEvents(
            pb.WatchEventsRequest(deployment_id=1, after=other.cursor), timeout=RPC_TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after" in (error.details() or "")


async def test_all_deployments_watch_needs_a_full_cursor(stub: pb_grpc.ActivityEventsStub) -> None:
    response = await create(stub, 1, 1)
    bare = response.cursor.split(":", 1)[1]
    error = await stream_status(
        stub.WatchEvents(pb.WatchEventsRequest(deployment_id=0, after=bare), timeout=RPC_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_all_deployments_watch_after_full_cursor(stub: pb_grpc.ActivityEventsStub) -> None:
    for round_ in range(1, 5):
        for deployment_id in (2, 1, 3):
            await create(stub, deployment_id, round_)
    everything = await watch(stub, 0)
    assert len(everything) == 12
    for position in (0, 4, 7, 11):
        after = await watch(stub, 0, after=everything[position].cursor)
        assert [s.cursor for s in after] == [s.cursor for s in everything[position + 1 :]]
    limited = await watch(stub, 0, after=everything[2].cursor, limit=4)
    assert [s.cursor for s in limited] == [s.cursor for s in everything[3:7]]


async def test_all_deployments_ties_are_ordered_by_deployment(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    """Entries of different streams may share an entry id; the merged order and the
    resume position must then go by deployment id, dropping or repeating nothing."""
    for round_ in range(1, 4):
        batch = [event(d, round_, f"d{d} r{round_}") for d in (3, 1, 2)]
        await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)
    everything = await watch(stub, 0)
    assert len(everything) == 9
    keys = [cursor_key(s.cursor) for s in everything]
    assert keys == sorted(keys)
    assert len(set(keys)) == 9
    merged = await list_events(stub, 0)
    assert [(e.deployment_id, e.id) for e in merged] == [
        (s.event.deployment_id, s.event.id) for s in everything
    ]
    for position in range(9):
        after = await watch(stub, 0, after=everything[position].cursor)
        assert [s.cursor for s in after] == [s.cursor for s in everything[position + 1 :]]
