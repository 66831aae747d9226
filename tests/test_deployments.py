"""ListDeployments and DeleteDeployment (admin)."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as redis_asyncio

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.streams import RPC_TIMEOUT, create, event, list_events, status_of, watch


async def list_page(
    stub: pb_grpc.ActivityEventsStub, page_size: int = 0, page_token: str = ""
) -> pb.ListDeploymentsResponse:
    response: pb.ListDeploymentsResponse = await stub.ListDeployments(
        pb.ListDeploymentsRequest(page_size=page_size, page_token=page_token), timeout=RPC_TIMEOUT
    )
    return response


async def create_deployments(stub: pb_grpc.ActivityEventsStub, ids: range) -> None:
    batch = [event(d, 1, f"deployment {d}") for d in ids]
    response = await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=RPC_TIMEOUT)
    assert all(r.outcome == pb.OUTCOME_CREATED for r in response.results)


async def test_list_deployments_counts_and_times(stub: pb_grpc.ActivityEventsStub) -> None:
    await create(stub, 3, 1)
    await create(stub, 1, 1)
    await create(stub, 3, 2)
    await create(stub, 2, 1)
    await create(stub, 2, 2)
    last_of_2 = await create(stub, 2, 3, "newest of two")
    page = await list_page(stub)
    assert page.next_page_token == ""
    assert [(d.id, d.event_count) for d in page.deployments] == [(1, 1), (2, 3), (3, 2)]
    two = page.deployments[1]
    stored = await list_events(stub, 2)
    assert two.first_receive == stored[0].timestamp.receive
    assert two.last_receive == stored[-1].timestamp.receive
    assert two.first_receive <= two.last_receive
    assert two.last_event.cursor == last_of_2.cursor
    assert two.last_event.event.id == 3
    assert two.last_event.event.message == "newest of two"
    assert two.last_event.event.timestamp.receive == two.last_receive


async def test_list_deployments_empty(stub: pb_grpc.ActivityEventsStub) -> None:
    page = await list_page(stub)
    assert list(page.deployments) == [] and page.next_page_token == ""


async def test_list_deployments_paging(stub: pb_grpc.ActivityEventsStub) -> None:
    await create_deployments(stub, range(1, 26))
    seen: list[int] = []
    token = ""
    sizes = []
    for _ in range(10):
        page = await list_page(stub, page_size=10, page_token=token)
        sizes.append(len(page.deployments))
        seen.extend(d.id for d in page.deployments)
        token = page.next_page_token
        if not token:
            break
    assert sizes == [10, 10, 5]
    assert seen == list(range(1, 26))


async def test_list_deployments_default_page_size_is_100(stub: pb_grpc.ActivityEventsStub) -> None:
    await create_deployments(stub, range(1, 106))
    first = await list_page(stub)
    assert [d.id for d in first.deployments] == list(range(1, 101))
    assert first.next_page_token
    second = await list_page(stub, page_token=first.next_page_token)
    assert [d.id for d in second.deployments] == list(range(101, 106))
    assert second.next_page_token == ""
    assert len((await list_page(stub, page_size=1000)).deployments) == 105


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [
        (-1, "", "page_size"),
        (1001, "", "page_size"),
        (10, "not a token", "page_token"),
        (10, "!!!", "page_token"),
    ],
)
async def test_list_deployments_bad_arguments(
    stub: pb_grpc.ActivityEventsStub, page_size: int, page_token: str, field: str
) -> None:
    await create_deployments(stub, range(1, 4))
    error = await status_of(list_page(stub, page_size=page_size, page_token=page_token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")


async def test_delete_deployment_removes_everything(
    stub: pb_grpc.ActivityEventsStub, redis_client: redis_asyncio.Redis
) -> None:
    for i in range(1, 6):
        await create(stub, 7, i)
    await create(stub, 8, 1, "neighbour")
    assert await redis_client.keys("ae:{d:7}:*"), "the test expects the documented key names"
    response = await stub.DeleteDeployment(
        pb.DeleteDeploymentRequest(deployment_id=7), timeout=RPC_TIMEOUT
    )
    assert response.deleted_events == 5
    assert await redis_client.keys("ae:{d:7}:*") == []
    members = {m.decode() for m in await redis_client.zrange("ae:deployments", 0, -1)}
    assert "7" not in members and "8" in members
    assert await list_events(stub, 7) == []
    assert await watch(stub, 7) == []
    assert [d.id for d in (await list_page(stub)).deployments] == [8]
    assert [e.message for e in await list_events(stub, 8)] == ["neighbour"]
    # The same (deployment, id) can be created anew, as a new event.
    again = await create(stub, 7, 1, "a different message")
    assert again.success and not again.duplicate
    assert (await create(stub, 7, 0)).id == 2
    assert [e.message for e in await list_events(stub, 7)] == ["a different message", "event 0"]


async def test_delete_unknown_and_invalid(stub: pb_grpc.ActivityEventsStub) -> None:
    error = await status_of(
        stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=999), timeout=RPC_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    for bad in (0, -1):
        error = await status_of(
            stub.DeleteDeployment(
                pb.DeleteDeploymentRequest(deployment_id=bad), timeout=RPC_TIMEOUT
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "deployment_id" in (error.details() or "")


async def test_delete_twice_is_not_found(stub: pb_grpc.ActivityEventsStub) -> None:
    await create(stub, 5, 1)
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=5), timeout=RPC_TIMEOUT)
    error = await status_of(
        stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=5), timeout=RPC_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_page_token_continues_after_concurrent_inserts(
    stub: pb_grpc.ActivityEventsStub,
) -> None:
    await create_deployments(stub, range(10, 30, 2))  # 10, 12, ... 28
    first = await list_page(stub, page_size=4)
    assert [d.id for d in first.deployments] == [10, 12, 14, 16]
    # New deployments before and after the page boundary while a client pages.
    await create_deployments(stub, range(1, 3))
    await create_deployments(stub, range(17, 18))
    rest: list[int] = []
    token = first.next_page_token
    for _ in range(10):
        page = await list_page(stub, page_size=4, page_token=token)
        rest.extend(d.id for d in page.deployments)
        token = page.next_page_token
        if not token:
            break
    assert rest == [17, 18, 20, 22, 24, 26, 28]


async def test_largest_deployment_id(stub: pb_grpc.ActivityEventsStub) -> None:
    largest = 2**31 - 1
    response = await create(stub, largest, 1)
    assert response.cursor.startswith(f"{largest}:")
    assert [s.event.deployment_id for s in await watch(stub, largest)] == [largest]
    page = await list_page(stub)
    assert [d.id for d in page.deployments] == [largest]
    deleted = await stub.DeleteDeployment(
        pb.DeleteDeploymentRequest(deployment_id=largest), timeout=RPC_TIMEOUT
    )
    assert deleted.deleted_events == 1
