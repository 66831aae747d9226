"""CreateEvent and CreateEvents: dedup, conflicts, id assignment, validation.

What was stored is checked in Redis directly (XLEN of the deployment's
stream), not only through the service's own answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.streams import RPC_TIMEOUT, create, event, list_events, now_ns, status_of

CREATED = pb.OUTCOME_CREATED
DUPLICATE = pb.OUTCOME_DUPLICATE
CONFLICT = pb.OUTCOME_CONFLICT
INVALID = pb.OUTCOME_INVALID


def events_key(deployment_id: int) -> str:
    return f"ae:{{d:{deployment_id}}}:events"


async def stored_count(redis_client: redis_asyncio.Redis, deployment_id: int) -> int:
    return int(await redis_client.xlen(events_key(deployment_id)))


async def test_create_then_duplicate(
    stub: pb_grpc.ActivityEventsStub, redis_client: redis_asyncio.Redis
) -> None:
    first = await create(stub, 1, 1, "hello")
    assert (first.id, first.success, first.duplicate) == (1, True, False)
    assert first.cursor.startswith("1:")
    # A retry carries a new send time: it is not part of the identity.
    again = await create(stub, 1, 1, "hello", send=now_ns() + 12345)
    assert (again.id, again.success, again.duplicate) == (1, True, True)
    assert again.cursor == first.cursor
    assert await stored_count(redis_client, 1) == 1
    [stored] = await list_events(stub, 1)
    assert stored.message == "hello"


async def test_200_concurrent_identical_creates_store_one(
    stub: pb_grpc.ActivityEventsStub, redis_client: redis_asyncio.Redis
) -> None:
    responses = await asyncio.gather(
        *(create(stub, 7, 42, "exactly once", send=now_ns()) for _ in range(200))
    )
    assert all(r.success and r.id == 42 for r in responses)
    assert sum(not r.duplicate for r in responses) == 1
    assert len({r.cursor for r in responses}) == 1
    assert await stored_count(redis_client, 7) == 1


async def test_conflict_names_the_id(
    stub: pb_grpc.ActivityEventsStub, redis_client: redis_asyncio.Redis
) -> None:
    await create(stub, 3, 4242, "original")
    error = await status_of(create(stub, 3, 4242, "changed"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "4242" in (error.details() or "")
    assert await stored_count(redis_client, 3) == 1
    [stored] = await list_events(stub, 3)
    assert stored.message == "original"


async def test_id_zero_under_concurrency_assigns_distinct_contiguous_ids(
    stub: pb_grpc.ActivityEventsStub, redis_client: redis_asyncio.Redis
) -> None:
    responses = await asyncio.gather(*(create(stub, 9, 0, f"auto {i}") for i in range(100)))
    ids = [r.id for r in responses]
    assert all(r.success and not r.duplicate for r in responses)
    assert sorted(ids) == list(range(1, 101))
    assert await stored_count(redis_client, 9) == 100
    listed = await list_events(stub, 9)
    assert sorted(e.id for e in listed) == list(range(1, 101))
    # Each stored event carries the id its response announced.
    by_message = {e.message: e.id for e in listed}
    assert all(by_message[f"auto {i}"] == responses[i].id for i in range(100))


async def test_id_zero_after_explicit_ids_takes_max_plus_one(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    await create(stub, 11, 5, "five")
    await create(stub, 11, 9, "nine")
    await create(stub, 11, 2, "two")
    assert (await create(stub, 11, 0, "auto")).id == 10
    assert (await create(stub, 11, 0, "auto again")).id == 11
    # Ids are per deployment.
    assert (await create(stub, 12, 0, "other deployment")).id == 1


async def test_missing_timestamp_is_accepted(stub: pb_grpc.ActivityEventsStub) -> None:
    before = now_ns()
    response = await create(stub, 2, 1, "no timestamp", timestamp=False)
    assert response.success and response.execution_time == 0
    [stored] = await list_events(stub, 2)
    assert stored.timestamp.send == 0
    assert before <= stored.timestamp.receive <= now_ns()


async def test_execution_time_is_receive_minus_send_in_ms(stub: pb_grpc.ActivityEventsStub) -> None:
    send = now_ns() - 5_000_000_000
    response = await create(stub, 2, 2, "five seconds ago", send=send)
    [stored] = await list_events(stub, 2)
    assert stored.timestamp.send == send
    assert response.execution_time == (stored.timestamp.receive - send) // 1_000_000
    assert 5000 <= response.execution_time < 65_000


@pytest.mark.parametrize(
    ("deployment_id", "event_id", "field"),
    [
        (0, 1, "deployment_id"),
        (-1, 1, "deployment_id"),
        (-2147483648, 1, "deployment_id"),
        (1, -1, "id"),
        (1, -2147483648, "id"),
    ],
)
async def test_create_validation(
    stub: pb_grpc.ActivityEventsStub,
    redis_client: redis_asyncio.Redis,
    deployment_id: int,
    event_id: int,
    field: str,
) -> None:
    error = await status_of(create(stub, deployment_id, event_id, "bad"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")
    assert await redis_client.keys("ae:*") == []


async def test_message_limit_counts_utf8_bytes(
    app_factory: Any, stub_for: Any, redis_client: redis_asyncio.Redis
) -> None:
    stub = stub_for(await app_factory(max_message_bytes=100))
    at_limit = "é" * 50  # 50 characters, 100 bytes
    assert (await create(stub, 1, 1, at_limit)).success
    over = "é" * 51  # 102 bytes: over the limit, though only 51 characters
    error = await status_of(create(stub, 1, 2, over))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message" in (error.details() or "")
    assert await stored_count(redis_client, 1) == 1


async def test_default_message_limit_is_64_kib(stub: pb_grpc.ActivityEventsStub) -> None:
    assert (await create(stub, 1, 1, "x" * 65536)).success
    error = await status_of(create(stub, 1, 2, "x" * 65537))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message" in (error.details() or "")


async def test_request_over_max_receive_bytes_is_resource_exhausted(
    app_factory: Any, stub_for: Any, redis_client: redis_asyncio.Redis
) -> None:
    stub = stub_for(await app_factory(max_receive_bytes=2048))
    error = await status_of(create(stub, 1, 1, "x" * 4096))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await stored_count(redis_client, 1) == 0
    # The server is still fine for requests under the limit.
    assert (await create(stub, 1, 1, "small")).success


async def test_create_events_batch_outcomes(
    stub: pb_grpc.ActivityEventsStub, redis_client: redis_asyncio.Redis
) -> None:
    existing = await create(stub, 1, 2, "stored before")
    batch = [
        event(1, 1, "new"),  # 0 created
        event(1, 2, "stored before"),  # 1 duplicate of a stored event
        event(1, 2, "changed"),  # 2 conflict with a stored event
        event(0, 5, "bad deployment"),  # 3 invalid
        event(1, -1, "bad id"),  # 4 invalid
        event(1, 6, "x" * 65537),  # 5 invalid message
        event(1, 3, "twice"),  # 6 created
        event(1, 3, "twice"),  # 7 duplicate inside the batch
        event(1, 4, "first"),  # 8 created
        event(1, 4, "second"),  # 9 conflict inside the batch
        event(2, 1, "other deployment"),  # 10 created
    ]
    response = await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)
    results = list(response.results)
    assert [r.index for r in results] == list(range(len(batch)))
    assert [r.outcome for r in results] == [
        CREATED,
        DUPLICATE,
        CONFLICT,
        INVALID,
        INVALID,
        INVALID,
        CREATED,
        DUPLICATE,
        CREATED,
        CONFLICT,
        CREATED,
    ]
    assert results[1].cursor == existing.cursor
    assert results[7].cursor == results[6].cursor
    assert "deployment_id" in results[3].reason
    assert "id" in results[4].reason
    assert "message" in results[5].reason
    assert results[2].reason and results[9].reason
    for index in (0, 1, 6, 7, 8, 10):
        assert results[index].cursor.startswith(f"{batch[index].deployment_id}:")
        assert results[index].receive > 0
        assert results[index].id == batch[index].id
        assert results[index].deployment_id == batch[index].deployment_id
    assert await stored_count(redis_client, 1) == 4  # 2 (before), 1, 3, 4
    assert await stored_count(redis_client, 2) == 1
    stored = {e.id: e.message for e in await list_events(stub, 1)}
    assert stored == {2: "stored before", 1: "new", 3: "twice", 4: "first"}


async def test_create_events_assigns_ids_for_zero(stub: pb_grpc.ActivityEventsStub) -> None:
    await create(stub, 4, 10, "ten")
    batch = [event(4, 0, "a"), event(4, 0, "b"), event(4, 0, "c")]
    response = await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)
    assert [r.outcome for r in response.results] == [CREATED] * 3
    assert sorted(r.id for r in response.results) == [11, 12, 13]


async def test_create_events_over_max_batch(
    app_factory: Any, stub_for: Any, redis_client: redis_asyncio.Redis
) -> None:
    stub = stub_for(await app_factory(max_batch=5))
    too_many = [event(1, i, f"e{i}") for i in range(1, 7)]
    error = await status_of(
        stub.CreateEvents(pb.CreateEventsRequest(events=too_many), timeout=RPC_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in (error.details() or "")
    assert await stored_count(redis_client, 1) == 0
    response = await stub.CreateEvents(
        pb.CreateEventsRequest(events=too_many[:5]), timeout=RPC_TIMEOUT
    )
    assert [r.outcome for r in response.results] == [CREATED] * 5
    assert await stored_count(redis_client, 1) == 5


async def test_empty_batch_is_ok(stub: pb_grpc.ActivityEventsStub) -> None:
    response = await stub.CreateEvents(pb.CreateEventsRequest(), timeout=RPC_TIMEOUT)
    assert list(response.results) == []


async def test_unicode_and_control_characters_round_trip(stub: pb_grpc.ActivityEventsStub) -> None:
    text = "déploiement ✅ 部署 \x00 tab\t newline\n 🚀"
    assert (await create(stub, 1, 1, text)).success
    [stored] = await list_events(stub, 1)
    assert stored.message == text
    assert (await create(stub, 1, 1, text)).duplicate


async def test_largest_id_and_exhausted_id_space(stub: pb_grpc.ActivityEventsStub) -> None:
    largest = 2**31 - 1
    assert (await create(stub, 1, largest, "last id")).id == largest
    error = await status_of(create(stub, 1, 0, "no id left"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "id" in (error.details() or "")
    response = await stub.CreateEvents(
        pb.CreateEventsRequest(events=[event(1, 0, "no id left either")]), timeout=RPC_TIMEOUT
    )
    [result] = response.results
    assert result.outcome == INVALID and "id" in result.reason
    # Explicit ids below the maximum are still accepted.
    assert (await create(stub, 1, 5, "explicit")).success
