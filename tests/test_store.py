"""Store behaviour below the API: scripts survive a flush, concurrent creates
coalesce without mixing up their answers, and bounded waits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio

from activity_events.codec import wire
from activity_events.domain.events import Cursor, NewEvent
from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis import keys
from activity_events.redis.store import Outcome
from tests.support.streams import create, event, list_events


async def test_scripts_are_reloaded_after_noscript(
    server: Any, stub: Any, redis_client: redis_asyncio.Redis
) -> None:
    await create(stub, 1, 1, "before")
    await redis_client.script_flush()
    again = await create(stub, 1, 2, "after the flush")
    assert again.success and not again.duplicate
    await redis_client.script_flush()
    batch = await stub.CreateEvents(
        pb.CreateEventsRequest(events=[event(1, 3), event(2, 1)]), timeout=10
    )
    assert [r.outcome for r in batch.results] == [pb.OUTCOME_CREATED, pb.OUTCOME_CREATED]
    await redis_client.script_flush()
    deleted = await stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=2), timeout=10)
    assert deleted.deleted_events == 1
    assert [e.id for e in await list_events(stub, 1)] == [1, 2, 3]


async def test_coalesced_creates_each_get_their_own_answer(
    server: Any, stub: Any, redis_client: redis_asyncio.Redis
) -> None:
    """Many concurrent creates over several deployments, some duplicates and
    conflicts among them, go to Redis together; each caller gets its own result."""
    calls = [
        (deployment, event_id, "odd one" if copy == 4 else f"e{event_id}")
        for copy in range(5)  # five calls per (deployment, id), one with another message
        for deployment in range(1, 6)
        for event_id in range(1, 21)
    ]
    results = await asyncio.gather(
        *(create(stub, d, i, m) for d, i, m in calls), return_exceptions=True
    )
    created: dict[tuple[int, int], str] = {}
    conflicts = 0
    for (d, i, m), result in zip(calls, results, strict=True):
        if isinstance(result, BaseException):
            assert "already exists" in str(result)
            conflicts += 1
            continue
        assert result.id == i
        assert result.cursor.startswith(f"{d}:")
        if not result.duplicate:
            assert (d, i) not in created
            created[(d, i)] = m
    assert len(created) == 100
    assert conflicts >= 100  # per pair, whichever message came second is refused
    for d in range(1, 6):
        stored = await list_events(stub, d)
        assert sorted((e.id, e.message) for e in stored) == sorted(
            (i, m) for (dd, i), m in created.items() if dd == d
        )
        assert await redis_client.xlen(keys.events(d)) == len(stored)


async def test_replay_pages_encode_exactly_like_the_reference(server: Any, stub: Any) -> None:
    """The replay path (unparsed XRANGE pages framed by wire.watch_responses_rows)
    must produce byte for byte what the protobuf runtime produces, for every
    varint width, across the byte budget, with limits and cursors."""
    sizes = [0, 1, 100, 127, 128, 300, 16_383, 16_384, 40_000, 5, 200_000 % 65_000]
    events = [event(9, i + 1, "é" * (n // 2) + "x" * (n % 2)) for i, n in enumerate(sizes)]
    await stub.CreateEvents(pb.CreateEventsRequest(events=events), timeout=10)
    store = server.store
    reference = await store.read_page(9, None, 100)
    pages = [rows async for rows in store.history_rows(9, None, None, 1 << 20)]
    rows = [row for page in pages for row in page]
    assert [payload for _, payload in rows] == [e.payload for e in reference]
    body = b"".join(m for m, _ in wire.watch_responses_rows(b"9:", rows, 1 << 30))
    assert body == b"".join(wire.watch_responses(reference, 1 << 30))
    parsed = pb.WatchEventsResponse.FromString(body)
    assert [e.event.id for e in parsed.events] == list(range(1, len(sizes) + 1))
    assert [e.cursor for e in parsed.events] == [str(e.cursor) for e in reference]
    # a small budget splits messages without changing the bytes
    split = list(wire.watch_responses_rows(b"9:", rows, 20_000))
    assert len(split) > 2 and b"".join(m for m, _ in split) == body
    # each message is marked with the rows it completes
    ends = [end for _, end in split]
    assert ends == sorted(ends) and ends[-1] == len(rows)
    sizes_of = [len(pb.WatchEventsResponse.FromString(m).events) for m, _ in split]
    assert [sum(sizes_of[: i + 1]) for i in range(len(split))] == ends
    # a limit stops exactly there, a cursor resumes after it
    limited = [rows async for rows in store.history_rows(9, None, 4, 1 << 20)]
    assert sum(len(rows) for rows in limited) == 4
    resume = Cursor.from_entry(9, limited[-1][-1][0])
    rest = [rows async for rows in store.history_rows(9, resume, None, 1 << 20)]
    assert sum(len(rows) for rows in rest) == len(sizes) - 4


async def test_an_entry_written_by_something_else_is_data_loss_not_a_crash(
    server: Any, stub: Any, redis_client: redis_asyncio.Redis
) -> None:
    await create(stub, 3, 1, "ours")
    await redis_client.xadd(keys.events(3), {b"x": b"not an event"})
    for request in (
        pb.WatchEventsRequest(deployment_id=0),  # merged in Python
        pb.WatchEventsRequest(deployment_id=3),  # the replay fast path
    ):
        history = stub.WatchEvents(request, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in history:
                pass
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        assert "has no event field" in (info.value.details() or "")
    listing = stub.ListEvents(pb.Deployment(id=3), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in listing:
            pass
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    # the server goes on serving
    assert (await create(stub, 3, 2, "still fine")).success


async def test_dedup_buckets_follow_ids_assigned_elsewhere(
    app_factory: Any, stub_for: Any, redis_client: redis_asyncio.Redis
) -> None:
    """A replica that has not seen a deployment guesses the wrong dedup bucket
    for id 0; the script answers NEED_BUCKET and the store re-sends, so the
    id is still max + 1 and dedup still works across buckets."""
    first, second = await app_factory(), await app_factory()
    a, b = stub_for(first), stub_for(second)
    batch = [event(4, 0, f"auto {n}") for n in range(300)]
    await a.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=10)  # ids 1..300
    reply = await create(b, 4, 0, "from the other replica")  # b guesses bucket 0
    assert reply.id == 301 and not reply.duplicate
    again = await create(b, 4, 301, "from the other replica")
    assert again.duplicate and again.cursor == reply.cursor
    conflict = await b.CreateEvents(pb.CreateEventsRequest(events=[event(4, 130, "other")]))
    assert conflict.results[0].outcome == pb.OUTCOME_CONFLICT
    members = {int(m) for m in await redis_client.smembers(keys.buckets(4))}
    assert members == {0, 1, 2}
    assert await redis_client.object("encoding", keys.ids(4, 1)) == b"listpack"

    deleted = await b.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=4), timeout=10)
    assert deleted.deleted_events == 301
    assert await redis_client.keys("ae:{d:4}:*") == []
    assert (await create(a, 4, 0, "anew")).id == 1  # a's stale hint is harmless too


async def test_dedup_index_is_compact_and_answers_the_stored_cursor(
    server: Any, stub: Any, redis_client: redis_asyncio.Redis
) -> None:
    """The dedup index holds a 6-byte digest and the entry id relative to the
    deployment's first entry; a duplicate of any event, stored in a burst (same
    millisecond, rising sequence) or after a pause, answers its exact cursor."""
    originals: dict[int, str] = {}
    for burst in range(3):
        batch = await stub.CreateEvents(
            pb.CreateEventsRequest(events=[event(7, 200 * burst + i + 1) for i in range(150)]),
            timeout=10,
        )
        for result in batch.results:
            assert result.outcome == pb.OUTCOME_CREATED
            originals[result.id] = result.cursor
        await asyncio.sleep(0.05)
    later = await create(stub, 7, 5000, "after a pause")
    originals[5000] = later.cursor
    assert len({Cursor.parse(c, deployment_id=7).seq for c in originals.values()}) > 1

    again = await stub.CreateEvents(
        pb.CreateEventsRequest(events=[event(7, i) for i in sorted(originals) if i != 5000]),
        timeout=10,
    )
    assert {r.outcome for r in again.results} == {pb.OUTCOME_DUPLICATE}
    assert {r.id: r.cursor for r in again.results} == {
        i: c for i, c in originals.items() if i != 5000
    }
    duplicate = await create(stub, 7, 5000, "after a pause")
    assert duplicate.duplicate and duplicate.cursor == originals[5000]

    for bucket in {keys.bucket_of(i) for i in originals}:
        key = keys.ids(7, bucket)
        assert await redis_client.object("encoding", key) == b"listpack"
        values = await redis_client.hvals(key)  # type: ignore[misc]
        assert values and max(len(v) for v in values) <= 6 + 6 + 3, key


async def test_ids_at_every_varint_width_are_stored_and_deduplicated(
    server: Any, stub: Any
) -> None:
    """append.lua encodes ids (and dedup times) as varints with fast paths below
    2**21: ids at each width's edges read back and deduplicate exactly."""
    ids = [1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**31 - 1]
    created = {i: (await create(stub, 8, i, f"m{i}")).cursor for i in ids}
    stored = await list_events(stub, 8)
    assert [(e.id, e.message) for e in stored] == [(i, f"m{i}") for i in ids]
    for i in ids:
        again = await create(stub, 8, i, f"m{i}")
        assert again.duplicate and again.cursor == created[i]


def _spy_round_trips(monkeypatch: pytest.MonkeyPatch, store: Any) -> list[int]:
    """Sizes (commands) of the write lane's round trips from now on."""
    lane = store.lanes.writes
    real = lane.send
    sizes: list[int] = []

    async def send(commands: Any) -> list[Any]:
        sizes.append(len(commands))
        return await real(commands)

    monkeypatch.setattr(lane, "send", send)
    return sizes


async def test_creates_arriving_close_together_share_round_trips(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: creates arriving a fraction of a millisecond apart wait a
    little for each other, so a round trip carries several (and each gets its
    own answer), instead of one round trip for every two or three creates."""
    store = server.store
    sizes = _spy_round_trips(monkeypatch, store)

    async def one(index: int) -> Any:
        await asyncio.sleep(index * 0.0002)
        new = NewEvent(
            deployment_id=77,
            event_id=index + 1,
            message=b"m%d" % index,
            send_ns=0,
            has_timestamp=False,
        )
        return await store.append_one(new, time.time_ns())

    results = await asyncio.gather(*(one(i) for i in range(300)))
    assert [r.event_id for r in results] == list(range(1, 301))
    assert {r.outcome for r in results} == {Outcome.CREATED}
    assert len(sizes) <= 300 / 4, f"{len(sizes)} round trips for 300 creates"


async def test_a_lone_create_is_sent_at_once(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a quiet spell a create does not linger for company: its round trip
    starts within a few turns of the event loop, not after LINGER_SECONDS."""
    store = server.store
    new = NewEvent(deployment_id=78, event_id=1, message=b"x", send_ns=0, has_timestamp=False)
    await store.append_one(new, time.time_ns())
    await asyncio.sleep(0.2)  # quiet: the arrival average forgets the burst
    sizes = _spy_round_trips(monkeypatch, store)
    for event_id in (2, 3):
        again = NewEvent(
            deployment_id=78, event_id=event_id, message=b"x", send_ns=0, has_timestamp=False
        )
        pending = asyncio.ensure_future(store.append_one(again, time.time_ns()))
        for _ in range(4):
            await asyncio.sleep(0)
        assert len(sizes) == event_id - 1, "the create waited instead of going out"
        assert (await pending).outcome is Outcome.CREATED
        await asyncio.sleep(0.2)
