"""Scale-out: several replicas on one Redis behave as one service, and
followers on one replica share a bounded number of Redis connections."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from activity_events.redis.connection import CLIENT_NAME
from tests.support.redis_process import RedisProcess
from tests.support.streams import Follower, event, list_events

REPLICAS = 3


async def our_connections(redis_server: RedisProcess) -> int:
    client = redis_asyncio.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        clients = await client.client_list()
        return sum(1 for c in clients if c.get("name") == CLIENT_NAME)
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_three_replicas_are_one_service(
    redis_server: RedisProcess, server_process_factory: Any, channel_factory: Any
) -> None:
    replicas = [
        server_process_factory({"ACTIVITY_REDIS_URL": redis_server.url}).start(wait=False)
        for _ in range(REPLICAS)
    ]
    for replica in replicas:
        await asyncio.to_thread(replica.wait_serving)
    stubs = [pb_grpc.ActivityEventsStub(channel_factory(r.port)) for r in replicas]

    # an event created through replica A reaches a follower on replica B
    follower = Follower(stubs[1], 1)
    try:
        await follower.until_caught_up()
        await stubs[0].CreateEvent(event(1, 1, "through A"), timeout=10)
        got = await follower.until_count(1, timeout=5)
        assert [(e.event.id, e.event.message) for e in got] == [(1, "through A")]
    finally:
        follower.cancel()

    # concurrent retries of one event through every replica store it once
    same = event(2, 7, "retried everywhere")
    replies = await asyncio.gather(
        *(
            stub.CreateEvent(same, timeout=10)
            for stub in itertools.islice(itertools.cycle(stubs), 60)
        )
    )
    assert all(r.success for r in replies)
    assert sum(not r.duplicate for r in replies) == 1
    assert len({r.cursor for r in replies}) == 1
    assert [e.id for e in await list_events(stubs[2], 2)] == [7]

    # id 0 assignment never hands out an id twice across replicas
    replies = await asyncio.gather(
        *(
            stub.CreateEvent(event(3, 0, f"auto {n}"), timeout=10)
            for n, stub in zip(range(90), itertools.cycle(stubs), strict=False)
        )
    )
    assert sorted(r.id for r in replies) == list(range(1, 91))
    stored = [e.id for e in await list_events(stubs[0], 3)]
    assert sorted(stored) == list(range(1, 91))


@pytest.mark.slow
async def test_followers_share_a_bounded_number_of_redis_connections(
    redis_server: RedisProcess, app_factory: Any, channel_factory: Any
) -> None:
    lanes = {"redis_write_connections": 1, "redis_read_connections": 1}
    app = await app_factory(redis_stream_connections=2, max_followers=1000, **lanes)
    bound = 4  # the three lanes' connections (1 + 1 + 2)
    channels = [channel_factory(app.port) for _ in range(10)]
    stubs = [pb_grpc.ActivityEventsStub(c) for c in channels]
    deployments = 10
    followers = [Follower(stubs[n % len(stubs)], 1 + n % deployments) for n in range(500)]
    try:
        await asyncio.gather(*(f.until_caught_up(timeout=60) for f in followers))
        writes = [
            stubs[0].CreateEvent(event(d, n), timeout=10)
            for n in range(1, 4)
            for d in range(1, deployments + 1)
        ]
        await asyncio.gather(*writes)
        await asyncio.gather(*(f.until_count(3, timeout=30) for f in followers))
        for n, f in enumerate(followers):
            assert [e.event.deployment_id for e in f.events] == [1 + n % deployments] * 3
        assert app.hub.follower_count == 500
        held = await our_connections(redis_server)
        # + the hub's blocking reader and the health probe's connection
        assert 1 <= held <= bound + 2, f"{held} connections for 500 followers (bound {bound} + 2)"
    finally:
        for f in followers:
            f.cancel()
    # a dropped follower is removed at once, and the hub stops reading idle streams
    for _ in range(100):
        if app.hub.follower_count == 0:
            break
        await asyncio.sleep(0.05)
    assert app.hub.follower_count == 0
    assert app.hub.watched_streams == 0


async def test_beyond_the_follower_limit_is_resource_exhausted(
    app_factory: Any, channel_factory: Any
) -> None:
    app = await app_factory(max_followers=3)
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    followers = [Follower(stub, 1) for _ in range(3)]
    try:
        await asyncio.gather(*(f.until_caught_up() for f in followers))
        extra = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=1, follow=True), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in extra:
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "followers" in (info.value.details() or "")
    finally:
        for f in followers:
            f.cancel()
