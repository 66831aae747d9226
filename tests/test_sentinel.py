"""Sentinel: the service follows a failover by itself; with WAIT on, no
acknowledged event is lost when the primary dies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events import SERVICE_NAME
from tests.support.sentinel import SentinelSet
from tests.support.streams import event, list_events

pytestmark = pytest.mark.slow

WRITERS = 4


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Any:
    pair = SentinelSet(tmp_path / "sentinel")
    try:
        yield pair.start()
    finally:
        pair.stop()


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["no-wait", "wait-1"])
async def test_failover_loses_no_acknowledged_event(
    sentinel_set: SentinelSet,
    app_factory: Any,
    stub_for: Any,
    channel_factory: Any,
    wait_replicas: int,
) -> None:
    """The primary is SIGKILLed under writes; Sentinel promotes the replica and
    the service follows it without a restart. With WAIT the old primary is
    brought back as a replica of the promoted one, since WAIT 1 needs one."""
    app = await app_factory(
        redis_url=sentinel_set.url, redis_wait_replicas=wait_replicas, redis_timeout_seconds=1.0
    )
    stub = stub_for(app)
    health = health_pb2_grpc.HealthStub(channel_factory(app.port))
    acknowledged: dict[int, set[int]] = {w: set() for w in range(WRITERS)}
    statuses: dict[str, int] = {}
    seen_health: list[int] = []
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        deployment = 100 + w
        n = 0
        while not stop.is_set():
            n += 1
            while not stop.is_set():  # retry the same id until acknowledged
                try:
                    reply = await stub.CreateEvent(event(deployment, n), timeout=3)
                except grpc.aio.AioRpcError as error:
                    statuses[error.code().name] = statuses.get(error.code().name, 0) + 1
                    assert error.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ), error.details()
                    await asyncio.sleep(0.05)
                    continue
                assert reply.success
                acknowledged[w].add(n)
                break
            await asyncio.sleep(0.01)

    async def watch_health() -> None:
        while not stop.is_set():
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1
                )
                if not seen_health or seen_health[-1] != reply.status:
                    seen_health.append(reply.status)
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
    tasks.append(asyncio.create_task(watch_health()))
    try:
        await asyncio.sleep(1.5)
        before = sum(len(a) for a in acknowledged.values())
        sentinel_set.primary.kill()
        killed_at = time.monotonic()
        await asyncio.to_thread(sentinel_set.wait_failover)
        if wait_replicas:
            await asyncio.to_thread(sentinel_set.rejoin_old_primary)
        # keep writing on the promoted replica for a while
        deadline = time.monotonic() + 20
        after_failover = sum(len(a) for a in acknowledged.values())
        while sum(len(a) for a in acknowledged.values()) < after_failover + 40:
            assert time.monotonic() < deadline, f"no writes after failover: {statuses}"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    # Health follows Redis by its own probe, which may trail the writers by a
    # probe interval or two: it must be SERVING again within seconds.
    for _ in range(50):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
        if seen_health[-1] != reply.status:
            seen_health.append(reply.status)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.1)

    assert before > 0
    assert statuses, "the outage was not visible to clients"
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert not_serving in seen_health and seen_health[-1] == serving, seen_health
    for w in range(WRITERS):
        stored = [e.id for e in await list_events(stub, 100 + w)]
        assert len(stored) == len(set(stored)), "duplicates stored"
        missing = acknowledged[w] - set(stored)
        assert not missing, f"writer {w} lost acknowledged events {sorted(missing)[:10]}"
    total = sum(len(a) for a in acknowledged.values())
    print(
        f"sentinel failover (WAIT {wait_replicas}): {total} acknowledged, 0 lost, "
        f"statuses {statuses}, resumed within {time.monotonic() - killed_at:.1f}s of the kill"
    )
