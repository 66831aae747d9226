"""The call pipeline treats every method of every service alike.

Each table below enumerates the methods from the service descriptors (so a
method added to the .proto is checked without touching this file) and calls
each one as raw bytes on a real server, expecting the same answer from the
pipeline whatever the method: malformed bytes are INVALID_ARGUMENT, a
draining server is UNAVAILABLE, a missing or insufficient token is
UNAUTHENTICATED or PERMISSION_DENIED, an unexpected exception is INTERNAL
with nothing internal in its message, and a call over its class's budget is
RESOURCE_EXHAUSTED naming the setting. And admission is race-free: N
simultaneous opens against a limit L admit exactly min(N, L).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.grpc import events, subscriptions
from activity_events.grpc.admission import CallClass, StreamKind
from activity_events.grpc.pipeline import Policy
from activity_events.pb import activityevents_pb2 as pb

TIMEOUT = 5.0
SERVICES = [pb.DESCRIPTOR.services_by_name[name] for name in ("ActivityEvents", "Subscriptions")]
METHODS: list[MethodDescriptor] = [m for service in SERVICES for m in service.methods]
POLICIES: dict[str, Policy] = {
    **{f"/{SERVICES[0].full_name}/{k}": v for k, v in events.POLICIES.items()},
    **{f"/{SERVICES[1].full_name}/{k}": v for k, v in subscriptions.POLICIES.items()},
}

WRITER = "writer-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef00"
TOKENS = {"writer": WRITER, "reader": READER, "admin": ADMIN}

MALFORMED = b"\xff\xff\xff\xff"
"""Not a protobuf message of any type (a field with a truncated varint key)."""


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def ids(methods: list[MethodDescriptor]) -> list[str]:
    return [m.name for m in methods]


async def call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: bytes = b"",
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with raw request bytes (one message; streams: read to the end)."""

    def identity(data: bytes) -> bytes:
        return data

    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    multicallable: Any = kinds[method.client_streaming, method.server_streaming](
        path(method), request_serializer=identity, response_deserializer=identity
    )
    argument: Any = iter([request]) if method.client_streaming else request
    try:
        result = multicallable(argument, metadata=metadata, timeout=TIMEOUT)
        if method.server_streaming:
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", METHODS, ids=ids(METHODS))
async def test_malformed_request_bytes_are_invalid_argument(
    server: Any, channel_factory: Callable[..., grpc.aio.Channel], method: MethodDescriptor
) -> None:
    code, details = await call(channel_factory(server.port), method, MALFORMED)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith(f"request: is not a valid {method.input_type.full_name}")


async def test_a_draining_server_answers_unavailable_on_every_method_but_health(
    server: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    channel = channel_factory(server.port)
    server.pipeline.draining = True
    for method in METHODS:
        code, details = await call(channel, method)
        assert code == grpc.StatusCode.UNAVAILABLE, (method.name, code, details)
        assert "shutting down" in details
    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)).status


@pytest.fixture
async def secured(app_factory: Any, tmp_path: Path) -> Any:
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{role} {token}\n" for role, token in TOKENS.items()))
    return await app_factory(auth_tokens_file=tokens)


@pytest.mark.parametrize("method", METHODS, ids=ids(METHODS))
async def test_tokens_are_checked_by_role_before_the_request_is_read(
    secured: Any, channel_factory: Callable[..., grpc.aio.Channel], method: MethodDescriptor
) -> None:
    channel = channel_factory(secured.port)
    role = POLICIES[path(method)].role
    assert role in TOKENS, "every method of the services needs a token"
    # Malformed bytes too: a refused caller never reaches the parser.
    code, details = await call(channel, method, MALFORMED)
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
    code, details = await call(channel, method, MALFORMED, (("authorization", "Bearer nope"),))
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
    for other, token in TOKENS.items():
        code, details = await call(
            channel, method, MALFORMED, (("authorization", f"Bearer {token}"),)
        )
        if other in (role, "admin"):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (other, code, details)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (other, code, details)
            assert details == f"{method.name} needs role {role}"
            assert token not in details


SECRET = "the-internal-detail-that-must-not-leak"


def exploding(method: MethodDescriptor) -> Callable[..., Any]:
    """A servicer method of ``method``'s shape that fails with an unexpected exception."""
    if method.server_streaming:

        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            if method.client_streaming:
                await anext(aiter(request))
            raise RuntimeError(SECRET)
            yield  # pragma: no cover - makes this an async generator

        return stream

    async def unary(self: Any, request: Any, context: Any) -> Any:
        if method.client_streaming:
            await anext(aiter(request))
        raise RuntimeError(SECRET)

    return unary


async def test_an_unexpected_exception_is_internal_and_reveals_nothing(
    app_factory: Any,
    channel_factory: Callable[..., grpc.aio.Channel],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    classes = {
        SERVICES[0].full_name: events.ActivityEventsService,
        SERVICES[1].full_name: subscriptions.SubscriptionsService,
    }
    for method in METHODS:
        monkeypatch.setattr(
            classes[method.containing_service.full_name], method.name, exploding(method)
        )
    app = await app_factory()
    channel = channel_factory(app.port)
    for method in METHODS:
        code, details = await call(channel, method)
        assert code == grpc.StatusCode.INTERNAL, (method.name, code, details)
        assert SECRET not in details and "RuntimeError" not in details
        handled = app.registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_service": method.containing_service.full_name,
                "grpc_method": method.name,
                "grpc_type": "bidi_stream"
                if method.client_streaming
                else "server_stream"
                if method.server_streaming
                else "unary",
                "grpc_code": "Internal",
            },
        )
        assert handled == 1, method.name
    # The log has what the client does not.
    assert sum(SECRET in record.getMessage() for record in caplog.records) >= len(METHODS)


async def test_over_budget_every_method_is_refused_naming_its_limit(
    server: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    channel = channel_factory(server.port)
    admission = server.admission
    for budget in [*admission.classes.values(), *admission.kinds.values()]:
        budget.active = budget.limit  # every slot taken
    try:
        for method in METHODS:
            admit = POLICIES[path(method)].admit
            if callable(admit):
                admit = admit(method.input_type._concrete_class())
            budget = (
                admission.kinds[admit]
                if isinstance(admit, StreamKind)
                else admission.classes[admit]
            )
            code, details = await call(channel, method)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (method.name, code, details)
            assert f"{budget.setting}={budget.limit}" in details, details
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for budget in [*admission.classes.values(), *admission.kinds.values()]:
            budget.active = 0
    shed = {
        (s.labels["class"], s.labels["reason"]): s.value
        for family in server.registry.collect()
        if family.name == "activity_load_shed"
        for s in family.samples
        if s.name == "activity_load_shed_total"
    }
    refused_reads = sum(1 for m in METHODS if POLICIES[path(m)].admit == CallClass.READS)
    assert shed[("reads", "inflight")] >= refused_reads
    assert shed[("writes", "inflight")] == 2  # CreateEvent, CreateEvents
    assert shed[("streams", "consumers")] == 1  # Subscribe
    assert shed[("health", "inflight")] == 1


async def test_simultaneous_opens_admit_exactly_the_limit(
    app_factory: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """300 followers open at once against max_followers=20: exactly 20 admitted."""
    app = await app_factory(max_followers=20)
    channels = [channel_factory(app.port) for _ in range(6)]
    request = pb.WatchEventsRequest(deployment_id=5, follow=True).SerializeToString()
    method = SERVICES[0].methods_by_name["WatchEvents"]
    calls = []
    for n in range(300):
        multicallable = channels[n % len(channels)].unary_stream(
            path(method), request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        calls.append(multicallable(request, timeout=30))

    async def first(call_: Any) -> grpc.StatusCode:
        try:
            await call_.read()  # the caught-up marker of an admitted follower
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    try:
        codes = await asyncio.gather(*(first(c) for c in calls))
    finally:
        for call_ in calls:
            call_.cancel()
    assert codes.count(grpc.StatusCode.OK) == 20
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 280
    followers = app.admission.kinds[StreamKind.FOLLOWERS]
    for _ in range(100):
        if followers.active == 0:
            break
        await asyncio.sleep(0.05)
    assert followers.active == 0 and app.admission.classes[CallClass.STREAMS].active == 0
