"""WatchEvents with follow=true: history, the caught-up marker, live events, back-pressure."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest

from activity_events.domain.events import Cursor
from activity_events.grpc.events import ActivityEventsService, _Watch
from activity_events.live.hub import Follower as HubFollower
from activity_events.live.hub import LiveEvent, Log
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.streams import RPC_TIMEOUT, Follower, create, event, wait_until, watch

#: Live events must reach followers quickly; this is the generous bound tests allow.
LIVE_TIMEOUT = 5.0


async def test_follow_sees_events_created_after_it_started(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    follower = Follower(stub, 1)
    try:
        first = await follower.read_one(RPC_TIMEOUT)
        assert first is not None and first.caught_up and not first.events
        responses = [await create(stub, 1, i, f"live {i}") for i in range(1, 6)]
        events = await follower.until_count(5, LIVE_TIMEOUT)
        assert [s.event.id for s in events] == [1, 2, 3, 4, 5]
        assert [s.cursor for s in events] == [r.cursor for r in responses]
        assert [s.event.message for s in events] == [f"live {i}" for i in range(1, 6)]
        assert all(s.event.timestamp.receive > 0 for s in events)
        assert follower.caught_up == 1
    finally:
        follower.cancel()


async def test_follow_delivers_history_then_marker_then_live(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    for i in range(1, 4):
        await create(stub, 1, i)
    follower = Follower(stub, 1)
    try:
        await follower.until_caught_up()
        assert follower.marker_at == 3
        assert [s.event.id for s in follower.events] == [1, 2, 3]
        await create(stub, 1, 4)
        await follower.until_count(4, LIVE_TIMEOUT)
        assert [s.event.id for s in follower.events] == [1, 2, 3, 4]
    finally:
        follower.cancel()


async def test_follow_from_cursor_while_writing_has_no_gap_or_repeat(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    history = [await create(stub, 2, i) for i in range(1, 31)]

    async def writer() -> None:
        for i in range(31, 131):
            await create(stub, 2, i)
            if i % 5 == 0:
                await asyncio.sleep(0.002)

    task = asyncio.create_task(writer())
    follower = Follower(stub, 2, after=history[9].cursor)
    try:
        await follower.until_count(120, 20)
        await asyncio.wait_for(task, 20)
        assert [s.event.id for s in follower.events] == list(range(11, 131))
        assert follower.caught_up == 1
        assert follower.marker_at is not None and follower.marker_at >= 20
        stored = await watch(stub, 2, after=history[9].cursor)
        assert [s.cursor for s in follower.events] == [s.cursor for s in stored]
        # Nothing more (no repeats) arrives afterwards.
        with contextlib.suppress(TimeoutError):
            extra = await follower.read_one(0.5)
            raise AssertionError(f"unexpected message after the last event: {extra}")
    finally:
        follower.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


async def test_follow_all_deployments_sees_new_deployments(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    await create(stub, 1, 1, "history")
    follower = Follower(stub, 0)
    try:
        await follower.until_caught_up()
        assert [(s.event.deployment_id, s.event.id) for s in follower.events] == [(1, 1)]
        order = [(1, 2), (2, 1), (777, 1), (1, 3), (777, 2)]
        for deployment_id, event_id in order:
            await create(stub, deployment_id, event_id)
            await asyncio.sleep(0.003)  # distinct entry-id milliseconds: arrival order is fixed
        await follower.until_count(1 + len(order), LIVE_TIMEOUT)
        live = [(s.event.deployment_id, s.event.id) for s in follower.events[1:]]
        assert live == order
        assert all(s.cursor.startswith(f"{s.event.deployment_id}:") for s in follower.events)
    finally:
        follower.cancel()


async def test_followers_only_see_their_deployment(stub: pb_grpc.ActivityEventsStub) -> None:
    one, two = Follower(stub, 1), Follower(stub, 2)
    try:
        await one.until_caught_up()
        await two.until_caught_up()
        await create(stub, 2, 1)
        await create(stub, 1, 1, "for one")
        await one.until_count(1, LIVE_TIMEOUT)
        await two.until_count(1, LIVE_TIMEOUT)
        assert [(s.event.deployment_id, s.event.message) for s in one.events] == [(1, "for one")]
        assert [s.event.deployment_id for s in two.events] == [2]
    finally:
        one.cancel()
        two.cancel()


async def test_follow_with_limit_ends_after_live_events(stub: pb_grpc.ActivityEventsStub) -> None:
    follower = Follower(stub, 3, limit=3)
    try:
        await create(stub, 3, 1)
        # The marker may or may not precede the first event; the limit counts events only.
        for i in range(2, 6):
            await create(stub, 3, i)
        await follower.until_count(3, LIVE_TIMEOUT)
        for _ in range(5):  # the stream must end by itself
            if await follower.read_one(LIVE_TIMEOUT) is None:
                break
        assert follower.ended
        assert [s.event.id for s in follower.events] == [1, 2, 3]
    finally:
        follower.cancel()


async def test_slow_follower_is_ended_with_its_last_cursor(app_factory: Any, stub_for: Any) -> None:
    app = await app_factory(follower_queue=4)
    stub = stub_for(app)
    # A separate connection for the slow reader, without BDP probing, so its
    # receive window stays small and the server's writes really back up.
    slow = stub_for(app, options=[("grpc.http2.bdp_probe", 0)])
    follower = Follower(slow, 1)
    total = 400
    payload = "x" * 16384
    try:
        await follower.until_caught_up()
        for start in range(1, total + 1, 50):
            batch = [event(1, i, f"{i} {payload}") for i in range(start, start + 50)]
            await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)
        error: grpc.aio.AioRpcError | None = None
        try:
            for _ in range(total + 10):
                if await follower.read_one(RPC_TIMEOUT) is None:
                    break
        except grpc.aio.AioRpcError as raised:
            error = raised
        assert error is not None, f"follower was not ended; got {len(follower.events)} events"
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error.details() or ""
        assert "last cursor" in details
        received = follower.events
        assert len(received) < total
        ids = [s.event.id for s in received]
        assert ids == list(range(1, len(ids) + 1)), "delivered events must be a gap-free prefix"
        if received:
            assert f"last cursor {received[-1].cursor}" in details
        else:
            assert "last cursor none" in details
        # Resuming from the last cursor yields the rest exactly. (A large receive
        # limit keeps this test about back-pressure, not about message sizes.)
        roomy = stub_for(app, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        rest = await watch(roomy, 1, after=received[-1].cursor if received else "")
        assert [s.event.id for s in rest] == list(range(len(ids) + 1, total + 1))
    finally:
        follower.cancel()


def follower_count(app: Any) -> int | None:
    """Followers the app's hub currently serves, if the hub exposes that."""
    hub = getattr(app, "hub", None)
    for name in ("follower_count", "followers"):
        value = getattr(hub, name, None)
        if callable(value):
            value = value()
        if isinstance(value, int):
            return value
        if value is not None and hasattr(value, "__len__"):
            return len(value)
    return None


async def test_cancelled_followers_are_released(
    server: Any, stub: pb_grpc.ActivityEventsStub
) -> None:
    followers = [Follower(stub, d) for d in (1, 1, 2, 0)]
    try:
        for follower in followers:
            await follower.until_caught_up()
        if follower_count(server) is not None:
            await wait_until(
                lambda: follower_count(server) == 4, 2, message="4 followers registered"
            )
    finally:
        for follower in followers:
            follower.cancel()
    if follower_count(server) is not None:
        await wait_until(lambda: follower_count(server) == 0, 3, message="followers released")
    # The server keeps serving new followers and writes after the cancellations.
    again = Follower(stub, 1)
    try:
        await again.until_caught_up()
        await create(stub, 1, 1)
        await again.until_count(1, LIVE_TIMEOUT)
    finally:
        again.cancel()


async def test_followers_beyond_max_followers_are_refused(app_factory: Any, stub_for: Any) -> None:
    stub = stub_for(await app_factory(max_followers=2))
    first, second = Follower(stub, 1), Follower(stub, 2)
    try:
        await first.until_caught_up()
        await second.until_caught_up()
        third = Follower(stub, 3)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await third.until_caught_up()
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            third.cancel()
        # History reads are not followers and still work.
        assert await watch(stub, 1) == []
        first.cancel()

        async def admitted() -> bool:
            again = Follower(stub, 4)
            try:
                await again.until_caught_up()
            except grpc.aio.AioRpcError:
                return False
            finally:
                again.cancel()
            return True

        await wait_until(admitted, 3, interval=0.1, message="a follower slot freed")
    finally:
        first.cancel()
        second.cancel()


async def test_server_stop_ends_followers_cleanly(app_factory: Any, stub_for: Any) -> None:
    app = await app_factory()
    stub = stub_for(app)
    follower = Follower(stub, 1)
    await follower.until_caught_up()
    await create(stub, 1, 1)
    await follower.until_count(1, LIVE_TIMEOUT)
    stopping = asyncio.create_task(app.stop())
    try:
        for _ in range(10):
            if await follower.read_one(LIVE_TIMEOUT) is None:
                break
        assert follower.ended, "the follow stream should end with OK on shutdown"
    finally:
        follower.cancel()
        await asyncio.wait_for(stopping, 10)


async def test_small_queue_follow_during_writes_never_gaps(app_factory: Any, stub_for: Any) -> None:
    """Live events overflowing a small queue while history is read must not open a gap:
    the follower either gets everything in order or is told where to resume."""
    app = await app_factory(follower_queue=8, page_size=7)
    stub = stub_for(app)
    for start in range(1, 301, 100):
        batch = [event(1, i) for i in range(start, start + 100)]
        await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)

    async def writer() -> None:
        for i in range(301, 501):
            await create(stub, 1, i)

    task = asyncio.create_task(writer())
    follower = Follower(stub, 1)
    error: grpc.aio.AioRpcError | None = None
    try:
        try:
            await follower.until_count(500, 30)
        except grpc.aio.AioRpcError as raised:
            error = raised
        await asyncio.wait_for(task, 30)
    finally:
        follower.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task
    ids = [s.event.id for s in follower.events]
    assert ids == list(range(1, len(ids) + 1)), "gap or repeat in the followed events"
    if error is None:
        assert len(ids) == 500
    else:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        last = follower.events[-1].cursor if follower.events else "none"
        assert f"last cursor {last}" in (error.details() or "")


async def test_all_deployments_follower_gets_concurrent_writes_exactly_once(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    follower = Follower(stub, 0)
    try:
        await follower.until_caught_up()

        async def writer(deployment_id: int) -> None:
            for i in range(1, 61):
                await create(stub, deployment_id, i)

        await asyncio.wait_for(asyncio.gather(*(writer(d) for d in (1, 2, 3))), 30)
        await follower.until_count(180, 10)
        seen = [(s.event.deployment_id, s.event.id) for s in follower.events]
        assert len(seen) == len(set(seen)) == 180
        for deployment_id in (1, 2, 3):
            ids = [i for d, i in seen if d == deployment_id]
            assert ids == list(range(1, 61)), f"deployment {deployment_id} out of order"
        with contextlib.suppress(TimeoutError):
            extra = await follower.read_one(0.3)
            raise AssertionError(f"unexpected message after the last event: {extra}")
    finally:
        follower.cancel()


async def test_live_events_history_already_sent_are_not_repeated() -> None:
    """The hub reads Redis on its own, so it may append an event that history
    already read even after history ended. A follower's live batches are checked
    event by event until one starts after everything sent, then go out whole."""
    loop = asyncio.get_running_loop()
    hub = type("StubHub", (), {"stopping": False, "loop": loop})()
    log = Log()
    follower = HubFollower(hub, 7, log)  # type: ignore[arg-type]
    events = [
        LiveEvent(Cursor(7, 1000, n), pb.EventRequest(id=n, deployment_id=7).SerializeToString())
        for n in range(1, 8)
    ]
    service = object.__new__(ActivityEventsService)
    service._hub = hub  # type: ignore[assignment]
    service._settings = type("S", (), {"page_size": 100})()  # type: ignore[assignment]
    service._max_message = 1 << 20
    watch = _Watch(7, None, None)
    watch.seen[7] = events[2].cursor  # history sent events 1..3 and ended
    live = service._live(watch, follower)
    received: list[int] = []

    async def take() -> None:
        message = await asyncio.wait_for(anext(live), 5)
        response = pb.WatchEventsResponse.FromString(message)
        received.extend(stored.event.id for stored in response.events)

    taking = asyncio.create_task(take())  # live phase begun, waiting for the hub
    await asyncio.sleep(0.05)
    assert not taking.done()
    log.append(events[1:5], 100, 1 << 20)  # 2..5: the hub caught up late
    log.wake()
    await taking
    assert received == [4, 5]
    taking = asyncio.create_task(take())
    await asyncio.sleep(0.05)
    log.append(events[5:], 100, 1 << 20)  # 6, 7: newer than all sent
    log.wake()
    await taking
    assert received == [4, 5, 6, 7]
    await live.aclose()
