"""Every feature on a real 3-primary Redis Cluster, including a slot moving
between primaries while a writer runs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.crc import key_slot

from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis import keys
from tests.support.cluster import RedisClusterProcesses
from tests.support.streams import Follower, create, event, list_events, status_of, watch

pytestmark = pytest.mark.slow

DEPLOYMENTS = range(1, 13)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    processes = RedisClusterProcesses(Path(tmp_path_factory.mktemp("cluster")))
    try:
        yield processes.start()
    finally:
        processes.stop()


@pytest.fixture
async def cluster_app(cluster: RedisClusterProcesses, app_factory: Any) -> Any:
    for node in cluster.nodes:
        cluster.client(node).flushall()
    return await app_factory(redis_url=cluster.url)


def _keyslot(key: str) -> int:
    return int(key_slot(key.encode()))


async def test_create_dedup_conflict_and_ids_across_slots(
    cluster: RedisClusterProcesses, cluster_app: Any, stub_for: Any
) -> None:
    stub = stub_for(cluster_app)
    for d in DEPLOYMENTS:
        first = await create(stub, d, 1, f"hello {d}")
        again = await create(stub, d, 1, f"hello {d}")
        assert first.success and not first.duplicate
        assert again.duplicate and again.cursor == first.cursor
        error = await status_of(create(stub, d, 1, "different"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    # id 0: concurrent assignment hands out distinct ids
    responses = await asyncio.gather(*(create(stub, 5, 0, "auto") for _ in range(40)))
    assert sorted(r.id for r in responses) == list(range(2, 42))
    # the deployments' keys live on more than one primary
    holding = [port for port, count in cluster.keys_per_node().items() if count > 0]
    assert len(holding) >= 2, cluster.keys_per_node()
    assert len({cluster.owner(_keyslot(keys.events(d))).port for d in DEPLOYMENTS}) >= 2


async def test_history_follow_resume_list_and_delete(
    cluster: RedisClusterProcesses, cluster_app: Any, stub_for: Any
) -> None:
    stub = stub_for(cluster_app)
    for n in range(1, 4):
        for d in DEPLOYMENTS:
            await create(stub, d, n, f"d{d} e{n}")
    assert [e.id for e in await list_events(stub, 3)] == [1, 2, 3]
    everything = await list_events(stub, 0)
    assert len(everything) == 3 * len(DEPLOYMENTS)
    stamps = [e.timestamp.receive for e in everything]
    assert stamps == sorted(stamps)  # arrival order across slots

    history = await watch(stub, 7)
    resumed = await watch(stub, 7, after=history[0].cursor)
    assert [e.event.id for e in resumed] == [2, 3]

    # follow one deployment and all of them, then write (a new deployment too)
    one = Follower(stub, 7, after=history[-1].cursor)
    everyone = Follower(stub, 0, after=everything and (await watch(stub, 0))[-1].cursor)
    try:
        await one.until_caught_up()
        await everyone.until_caught_up()
        await create(stub, 7, 4, "live")
        await create(stub, 99, 1, "brand new deployment")
        got = await one.until_count(1, timeout=5)
        assert [e.event.id for e in got] == [4]
        both = await everyone.until_count(2, timeout=5)
        assert {(e.event.deployment_id, e.event.id) for e in both} == {(7, 4), (99, 1)}
    finally:
        one.cancel()
        everyone.cancel()

    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=10)
    assert [d.id for d in listed.deployments] == [*DEPLOYMENTS, 99]
    assert {d.id: d.event_count for d in listed.deployments}[7] == 4

    deleted = await stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=7), timeout=10)
    assert deleted.deleted_events == 4
    assert await list_events(stub, 7) == []
    error = await status_of(
        stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=7), timeout=10)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_slot_migration_while_writing(
    cluster: RedisClusterProcesses, cluster_app: Any, stub_for: Any
) -> None:
    stub = stub_for(cluster_app)
    deployment = 4242
    slot = _keyslot(keys.events(deployment))
    for n in range(1, 51):
        await create(stub, deployment, n)
    source = cluster.owner(slot)
    target = next(node for node in cluster.nodes if node is not source)

    failures: list[str] = []
    written: list[int] = []
    done = asyncio.Event()

    async def writer() -> None:
        n = 50
        while not done.is_set() or n < 120:
            n += 1
            try:
                response = await stub.CreateEvent(event(deployment, n), timeout=10)
                assert response.success and response.id == n
                written.append(n)
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
            await asyncio.sleep(0.005)

    task = asyncio.create_task(writer())
    try:
        moved = await asyncio.to_thread(cluster.move_slot, slot, target, 1, 0.02)
    finally:
        done.set()
        await asyncio.wait_for(task, 30)
    assert moved >= 3  # the stream, its dedup index and its metadata
    assert cluster.owner(slot) is target
    assert failures == []
    stored = [e.id for e in await list_events(stub, deployment)]
    assert stored == list(range(1, 51)) + written
