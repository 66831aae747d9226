"""Under load the service degrades on purpose: each promise of docs/operations.md's
"Under load", on a real server and a real redis-server, bounded in count and time.

The throughput figures (writers' share during read and viewer storms, RSS)
are the benchmark tool's (`activity-bench overload`), not these tests': on a
shared machine a timed assertion would flake.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.grpc.admission import CallClass, StreamKind, Turns
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.redis_process import RedisProcess

TIMEOUT = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING


async def fill(stub: pb_grpc.ActivityEventsStub, deployment: int, count: int, size: int) -> None:
    message = "x" * size
    batch = max(1, min(500, 3_000_000 // max(1, size)))  # under gRPC's 4 MiB a message
    for first in range(0, count, batch):
        events = [
            pb.EventRequest(id=n + 1, deployment_id=deployment, message=message)
            for n in range(first, min(count, first + batch))
        ]
        await stub.CreateEvents(pb.CreateEventsRequest(events=events), timeout=TIMEOUT)


async def settle(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- bursts


async def test_a_burst_of_3000_creates_gets_only_ok_or_resource_exhausted(
    app_factory: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """No call is cancelled by the transport or left to time out: each is answered,
    and those over max_inflight_writes are refused naming it and counted."""
    app = await app_factory(max_inflight_writes=300)
    stubs = [pb_grpc.ActivityEventsStub(channel_factory(app.port)) for _ in range(4)]
    codes: collections.Counter[str] = collections.Counter()
    details: set[str] = set()

    async def create(n: int) -> None:
        request = pb.EventRequest(id=n + 1, deployment_id=11, message="burst")
        try:
            await stubs[n % len(stubs)].CreateEvent(request, timeout=60)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            codes[error.code().name] += 1
            details.add(error.details() or "")

    await asyncio.gather(*(create(n) for n in range(3000)))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] >= 300 and sum(codes.values()) == 3000
    for text in details:
        assert "max_inflight_writes=300" in text
    shed = app.registry.get_sample_value(
        "activity_load_shed_total", {"class": "writes", "reason": "inflight"}
    )
    assert shed == codes["RESOURCE_EXHAUSTED"]
    handled = app.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_service": "activityevents.ActivityEvents",
            "grpc_method": "CreateEvent",
            "grpc_type": "unary",
            "grpc_code": "ResourceExhausted",
        },
    )
    assert handled == codes["RESOURCE_EXHAUSTED"]


# --------------------------------------------------------------------------- stalled readers


async def test_a_stream_the_client_does_not_read_is_ended_and_its_slot_released(
    app_factory: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """Two legacy ListEvents read once and then not at all hold both read slots;
    after stream_stall_seconds they are ended, the slots come back, and the
    client that finally reads gets what was in flight and then the status."""
    app = await app_factory(max_inflight_reads=2, stream_stall_seconds=1.0)
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    await fill(stub, 1, 400, 30_000)  # 12 MB: far more than flow control lets through
    holders_channel = channel_factory(app.port)
    holders = pb_grpc.ActivityEventsStub(holders_channel)
    calls = [holders.ListEvents(pb.Deployment(id=1), timeout=60) for _ in range(2)]
    for call in calls:
        assert (await asyncio.wait_for(call.read(), TIMEOUT)).id == 1
    reads = app.admission.classes[CallClass.READS]
    assert reads.active == 2
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await settle(lambda: reads.active == 0, 10.0), "stalled streams kept their slots"
    assert (await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)).deployments
    for call in calls:
        received = 1
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await asyncio.wait_for(call.read(), TIMEOUT) is not grpc.aio.EOF:
                received += 1
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stream_stall_seconds=1" in (ended.value.details() or "")
        assert 1 < received < 400
    stalled = app.registry.get_sample_value(
        "activity_load_shed_total", {"class": "reads", "reason": "stalled"}
    )
    assert stalled == 2


async def test_a_stalled_watch_is_told_where_to_resume(
    app_factory: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """The stalled WatchEvents status names its last cursor; resuming after it
    yields the rest with no gap and no repeat."""
    app = await app_factory(stream_stall_seconds=1.0, stream_buffer_bytes=64 * 1024)
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    await fill(stub, 2, 600, 20_000)
    call = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=2), timeout=60)
    first = await asyncio.wait_for(call.read(), TIMEOUT)
    await asyncio.sleep(3.0)  # not reading: the server ends the stream
    got = [e.event.id for e in first.events]
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while (response := await asyncio.wait_for(call.read(), TIMEOUT)) is not grpc.aio.EOF:
            got += [e.event.id for e in response.events]
    details = ended.value.details() or ""
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    cursor = details.rpartition("resume with after=")[2]
    assert cursor.startswith("2:"), details
    rest = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=2, after=cursor), timeout=60)
    resumed = [e.event.id async for response in rest for e in response.events]
    # The cursor is that of the last message grpc finished sending: the client
    # has at least that much (the message in flight may have arrived too), so
    # resuming after it misses nothing; at most that last message repeats.
    assert got == list(range(1, len(got) + 1))
    assert resumed == list(range(resumed[0], 601))
    assert resumed[0] <= got[-1] + 1, "a gap between what was received and the resume"
    assert got[-1] - resumed[0] < len(first.events) * 2


# --------------------------------------------------------------------------- Redis lanes


async def test_waiting_for_a_busy_lane_is_resource_exhausted_not_unavailable(
    app_factory: Any,
    channel_factory: Callable[..., grpc.aio.Channel],
    redis_server: RedisProcess,
) -> None:
    """One read connection, held by a call while Redis holds commands: the next read waits
    redis_pool_wait_seconds for the lane and is refused RESOURCE_EXHAUSTED (the
    lane's setting named), while a write, on its own lane, is not refused."""
    app = await app_factory(
        redis_read_connections=1, redis_pool_wait_seconds=0.2, redis_timeout_seconds=5.0
    )
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    await fill(stub, 3, 10, 10)
    blocker = redis_asyncio.Redis.from_url(redis_server.url, socket_timeout=10)
    try:
        # Redis holds every client's commands for 1.5 s: the next command waits.
        await blocker.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        holding = asyncio.ensure_future(
            stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)
        )
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)
        waited = time.monotonic() - started
        writing = asyncio.ensure_future(
            stub.CreateEvent(pb.EventRequest(id=99, deployment_id=3, message="w"), timeout=TIMEOUT)
        )
        assert (await holding).deployments  # Redis woke within the command timeout
        assert (await writing).success
    finally:
        await blocker.aclose()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "redis_read_connections=1" in (refused.value.details() or "")
    assert waited < 1.2, waited
    assert (
        app.registry.get_sample_value(
            "activity_load_shed_total", {"class": "reads", "reason": "redis_pool"}
        )
        == 1
    )


# --------------------------------------------------------------------------- health


async def test_health_stays_serving_through_a_read_storm_with_writers(
    app_factory: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """Thirty full-history readers (eight admitted) and twenty writers for a few
    seconds: health never leaves SERVING, readers end OK or RESOURCE_EXHAUSTED,
    and writers keep being served."""
    app = await app_factory()
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    await fill(stub, 4, 20_000, 20)
    health = health_pb2_grpc.HealthStub(channel_factory(app.port))
    reader_codes: collections.Counter[str] = collections.Counter()
    statuses: list[int] = []
    writes = 0
    stop = time.monotonic() + 4.0

    async def reader(channel: grpc.aio.Channel) -> None:
        call = pb_grpc.ActivityEventsStub(channel).ListEvents(pb.Deployment(id=0), timeout=120)
        try:
            async for _ in call:
                pass
            reader_codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            reader_codes[error.code().name] += 1

    async def writer(n: int) -> None:
        nonlocal writes
        while time.monotonic() < stop:
            request = pb.EventRequest(deployment_id=5, message=f"writer {n}")
            await stub.CreateEvent(request, timeout=TIMEOUT)
            writes += 1

    async def prober() -> None:
        while time.monotonic() < stop:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            statuses.append(reply.status)
            await asyncio.sleep(0.1)

    channels = [channel_factory(app.port) for _ in range(5)]
    readers = [asyncio.create_task(reader(channels[n % 5])) for n in range(30)]
    await asyncio.gather(prober(), *(writer(n) for n in range(20)))
    await asyncio.wait_for(asyncio.gather(*readers), 120)
    assert statuses and set(statuses) == {SERVING}
    assert writes > 20
    assert set(reader_codes) <= {"OK", "RESOURCE_EXHAUSTED"}, reader_codes
    assert reader_codes["OK"] >= 8


# --------------------------------------------------------------------------- loop turns


async def test_turns_hand_out_a_fixed_number_of_tickets_per_loop_iteration() -> None:
    turns = Turns(per_turn=2)
    iteration = 0
    taken: list[int] = []

    async def ticker() -> None:
        nonlocal iteration
        for _ in range(200):
            iteration += 1
            await asyncio.sleep(0)

    async def stream() -> None:
        for _ in range(5):
            await turns.take()
            taken.append(iteration)

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(stream() for _ in range(6)))
    tick.cancel()
    per_iteration = collections.Counter(taken)
    assert len(taken) == 30
    assert max(per_iteration.values()) <= 2 + 1  # a turn's two, plus one racing the tick


async def test_turns_count_no_tickets_while_nothing_contends() -> None:
    """Without writes in progress streams take tickets without waiting for a
    turn; once writes start, the per-turn limit holds again."""
    writing = False
    turns = Turns(per_turn=1, contended=lambda: writing)
    iteration = 0

    async def ticker() -> None:
        nonlocal iteration
        for _ in range(200):
            iteration += 1
            await asyncio.sleep(0)

    async def stream(taken: list[int]) -> None:
        for _ in range(5):
            await turns.take()
            taken.append(iteration)

    tick = asyncio.create_task(ticker())
    free: list[int] = []
    await asyncio.gather(*(stream(free) for _ in range(4)))
    assert len(free) == 20 and len(set(free)) == 1  # all in the turn they asked in
    writing = True
    limited: list[int] = []
    await asyncio.gather(*(stream(limited) for _ in range(4)))
    tick.cancel()
    assert len(limited) == 20
    assert max(collections.Counter(limited).values()) <= 1 + 1


async def test_follower_slots_come_back_when_followers_leave(
    app_factory: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    app = await app_factory(max_followers=3, max_streams=3)
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    calls = [
        stub.WatchEvents(pb.WatchEventsRequest(deployment_id=6, follow=True)) for _ in range(3)
    ]
    for call in calls:
        assert (await asyncio.wait_for(call.read(), TIMEOUT)).caught_up
    extra = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=6, follow=True), timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await extra.read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in calls:
        call.cancel()
    kinds = app.admission.kinds[StreamKind.FOLLOWERS]
    assert await settle(lambda: kinds.active == 0 and app.hub.follower_count == 0)
    again = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=6, follow=True), timeout=TIMEOUT)
    assert (await asyncio.wait_for(again.read(), TIMEOUT)).caught_up
    again.cancel()
