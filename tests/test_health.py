"""Health: real status from Redis, Watch streams that follow it, and a shutdown
that does not wait for open Watch streams."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events import SERVICE_NAME
from activity_events.grpc.health import LIVENESS
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_watch_ends_after_final_not_serving_and_stop_is_prompt(
    app_factory: Any, channel_factory: Any
) -> None:
    app = await app_factory(grace_seconds=8.0)
    health = health_pb2_grpc.HealthStub(channel_factory(app.port))
    watches = [
        health.Watch(health_pb2.HealthCheckRequest(service=name)) for name in ("", SERVICE_NAME)
    ]
    for watch in watches:
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.status == SERVING

    started = time.monotonic()
    await app.stop()
    took = time.monotonic() - started
    assert took < 3.0, f"stop waited {took:.1f}s for open health watches"

    for watch in watches:
        rest = []
        while (message := await asyncio.wait_for(watch.read(), 5)) is not grpc.aio.EOF:
            rest.append(message.status)
        assert rest == [NOT_SERVING]
        assert await watch.code() == grpc.StatusCode.OK


async def test_check_reports_both_names(server: Any, channel_factory: Any) -> None:
    health = health_pb2_grpc.HealthStub(channel_factory(server.port))
    for name in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == SERVING
    try:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("unknown service must be NOT_FOUND")


async def test_undecodable_request_is_invalid_argument(server: Any, channel_factory: Any) -> None:
    channel = channel_factory(server.port)
    for method in ("CreateEvent", "CreateEvents", "DeleteDeployment", "ListDeployments"):
        call = channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        try:
            await call(b"\x12\x02\xff\xfe\x0a\x05abc", timeout=5)  # bad UTF-8, truncated field
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
            assert "request: is not a valid activityevents." in (error.details() or "")
        else:
            raise AssertionError(f"{method} accepted garbage")
    stream = channel.unary_stream(f"/{SERVICE_NAME}/WatchEvents")
    call = stream(b"\x12\x03\xc3\x28\x00", timeout=5)
    try:
        async for _ in call:
            raise AssertionError("no message expected")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_calls_arriving_while_draining_get_unavailable(
    app_factory: Any, redis_server: Any, channel_factory: Any
) -> None:
    """While an in-flight call drains, new calls are refused with a retryable
    UNAVAILABLE (not CANCELLED), and the in-flight call still completes."""
    app = await app_factory(redis_timeout_seconds=3.0, grace_seconds=5.0)
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    await stub.CreateEvent(pb.EventRequest(id=1, deployment_id=1, message="warm"), timeout=5)
    redis_server.pause()
    try:
        in_flight = asyncio.ensure_future(
            stub.CreateEvent(pb.EventRequest(id=2, deployment_id=1, message="slow"), timeout=10)
        )
        await asyncio.sleep(0.3)
        stopping = asyncio.ensure_future(app.stop())
        await asyncio.sleep(0.2)
        try:
            await stub.CreateEvent(pb.EventRequest(id=3, deployment_id=1), timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert "shutting down" in (error.details() or "")
        else:
            raise AssertionError("a call accepted while draining")
    finally:
        redis_server.resume()
    reply = await in_flight
    assert reply.success and reply.id == 2
    await asyncio.wait_for(stopping, 10)


async def test_liveness_name_ignores_redis_outages(
    app_factory: Any, redis_server: Any, channel_factory: Any
) -> None:
    """The overall "" and the service name follow Redis; "liveness" (probed by
    the chart's liveness probe) stays SERVING, so an outage never restarts pods."""
    app = await app_factory()
    health = health_pb2_grpc.HealthStub(channel_factory(app.port))

    async def status(name: str) -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        return int(reply.status)

    assert await status(LIVENESS) == SERVING
    redis_server.kill()
    for _ in range(100):
        if await status("") == NOT_SERVING:
            break
        await asyncio.sleep(0.05)
    assert await status("") == NOT_SERVING
    assert await status(SERVICE_NAME) == NOT_SERVING
    assert await status(LIVENESS) == SERVING
