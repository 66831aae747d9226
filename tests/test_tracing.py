"""Traces, checked at a real OTLP receiver fed by the real OTLP gRPC exporter.

The receiver is opentelemetry-proto's ``TraceService`` hosted here on a free
port; the exporter is configured the way operators configure it, through
``OTEL_*`` variables. Spans come from the call pipeline on a real grpc.aio
server and from an instrumented client of a real redis-server.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from activity_events.app.settings import Settings
from activity_events.grpc.admission import Admission, CallClass
from activity_events.grpc.health import POLICIES as HEALTH_POLICIES
from activity_events.grpc.pipeline import Pipeline, Policy
from activity_events.grpc.watchdog import StreamWatchdog
from activity_events.observability.grpc_metrics import GrpcServerMetrics
from activity_events.observability.metrics import ServiceMetrics
from activity_events.observability.redis_observer import instrument_redis
from activity_events.observability.tracing import (
    ServerTracing,
    build_resource,
    configure_tracing,
    shutdown_tracing,
)
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.observability_probe import wait_for
from tests.support.redis_process import RedisProcess

SERVICE = "tracetest.Probe"
CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict[str, str]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            self.resources.append(
                {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[trace_pb2.Span]:
        return [s for s in self.spans if s.name == name]


def attributes(span: trace_pb2.Span) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for attribute in span.attributes:
        kind = attribute.value.WhichOneof("value")
        found[attribute.key] = getattr(attribute.value, kind) if kind else None
    return found


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    collector = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield collector, port
    finally:
        await server.stop(grace=None)


@pytest.fixture
def provider(
    receiver: tuple[Receiver, int], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TracerProvider]:
    """A provider built from OTEL_* variables only, exporting to ``receiver``."""
    _, port = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "activity-test")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    built = configure_tracing(version="9.9.9", set_global=False)
    assert built is not None
    return built  # type: ignore[return-value]


class TracedProbe:
    """Handlers that use Redis (unary) and stream history then live messages (follow)."""

    def __init__(self, client: redis_asyncio.Redis) -> None:
        self.client = client
        self.live = asyncio.Queue[int]()
        self.port = 0

    async def create(self, request: pb.EventRequest, context: Any) -> pb.EventResponse:
        await self.client.set(f"probe:{request.deployment_id}:{request.id}", request.message)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(f"probe:{request.deployment_id}:{request.id}")
        pipe.incr("probe:count")
        await pipe.execute()
        if request.id < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id must be >= 0")
        if request.message == "explode":
            raise RuntimeError("boom")
        return pb.EventResponse(id=request.id, success=True)

    async def watch(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        await self.client.get("probe:history")
        yield pb.WatchEventsResponse(events=[pb.StoredEvent(cursor="1-0")])
        yield pb.WatchEventsResponse(caught_up=True)
        while True:
            number = await asyncio.wait_for(self.live.get(), 10)
            if number < 0:
                return
            yield pb.WatchEventsResponse(events=[pb.StoredEvent(cursor=f"{number}-0")] * 2)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        _descriptor()
        return {
            "Create": grpc.unary_unary_rpc_method_handler(
                self.create, pb.EventRequest.FromString, pb.EventResponse.SerializeToString
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.watch,
                pb.WatchEventsRequest.FromString,
                pb.WatchEventsResponse.SerializeToString,
            ),
        }


def _descriptor() -> None:
    """Register ``tracetest.Probe`` (Create and Watch on the service's messages)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto(
        name="tests/tracetest.proto", package="tracetest", syntax="proto3"
    )
    proto.dependency.append(pb.DESCRIPTOR.name)
    service = proto.service.add(name="Probe")
    service.method.add(
        name="Create",
        input_type=".activityevents.EventRequest",
        output_type=".activityevents.EventResponse",
    )
    service.method.add(
        name="Watch",
        input_type=".activityevents.WatchEventsRequest",
        output_type=".activityevents.WatchEventsResponse",
        server_streaming=True,
    )
    pool.Add(proto)


PROBE_POLICIES = {"Create": Policy(CallClass.WRITES, None), "Watch": Policy(CallClass.READS, None)}


def traced_grpc_server(
    probe: TracedProbe, tracing: ServerTracing, health_servicer: Any = None
) -> tuple[grpc.aio.Server, Pipeline]:
    """A grpc.aio server with ``probe`` (and health) behind the call pipeline."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pipeline = Pipeline(
        admission=Admission(Settings()),
        metrics=GrpcServerMetrics(CollectorRegistry()),
        watchdog=StreamWatchdog(30.0),
        tracing=tracing,
    )
    if health_servicer is not None:
        pipeline.add(
            server, health_pb2_grpc.add_HealthServicer_to_server, health_servicer, HEALTH_POLICIES
        )
    pipeline.add_handlers(server, SERVICE, probe.handlers(), PROBE_POLICIES)
    return server, pipeline


@pytest.fixture
async def traced_server(
    provider: TracerProvider, redis_server: RedisProcess
) -> AsyncIterator[tuple[grpc.aio.Channel, TracedProbe, CollectorRegistry]]:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, runtime=False)
    client = instrument_redis(
        redis_asyncio.Redis.from_url(redis_server.url, socket_timeout=5), metrics, provider
    )
    probe = TracedProbe(client)
    health_servicer = health.aio.HealthServicer()
    server, pipeline = traced_grpc_server(probe, ServerTracing(provider), health_servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    probe.port = port
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, probe, registry
    finally:
        await channel.close()
        await server.stop(grace=1.0)
        await pipeline.watchdog.stop()
        await client.aclose()
        shutdown_tracing(provider)


def _create(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/Create",
        request_serializer=pb.EventRequest.SerializeToString,
        response_deserializer=pb.EventResponse.FromString,
    )


async def _flushed(provider: TracerProvider, receiver: Receiver, predicate: Any) -> bool:
    await asyncio.to_thread(provider.force_flush, 5000)
    return await wait_for(lambda: predicate(receiver), timeout=5)


async def test_server_span_with_client_parent_and_redis_children(
    traced_server: Any, provider: TracerProvider, receiver: tuple[Receiver, int]
) -> None:
    channel, _, registry = traced_server
    collector, _ = receiver
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    reply = await _create(channel)(
        pb.EventRequest(id=5, deployment_id=42, message="hello"),
        metadata=(("traceparent", traceparent),),
        timeout=5,
    )
    assert reply.success
    assert await _flushed(
        provider, collector, lambda r: len(r.named(f"{SERVICE}/Create")) == 1 and len(r.spans) >= 3
    )
    (server_span,) = collector.named(f"{SERVICE}/Create")
    assert server_span.trace_id.hex() == CLIENT_TRACE_ID
    assert server_span.parent_span_id.hex() == CLIENT_SPAN_ID
    assert server_span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    found = attributes(server_span)
    assert found["rpc.system"] == "grpc"
    assert found["rpc.service"] == SERVICE
    assert found["rpc.method"] == "Create"
    assert found["rpc.grpc.status_code"] == 0
    assert found["activity.deployment_id"] == 42
    assert found["network.peer.address"] == "127.0.0.1"
    assert server_span.status.code == trace_pb2.Status.STATUS_CODE_UNSET

    children = [s for s in collector.spans if s.parent_span_id == server_span.span_id]
    assert sorted(s.name for s in children) == ["PIPELINE", "SET"]
    for child in children:
        assert child.trace_id.hex() == CLIENT_TRACE_ID
        assert child.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert attributes(child)["db.system"] == "redis"
        assert server_span.start_time_unix_nano <= child.start_time_unix_nano
        assert child.end_time_unix_nano <= server_span.end_time_unix_nano

    assert collector.resources[0]["service.name"] == "activity-test"
    assert collector.resources[0]["service.version"] == "9.9.9"
    assert collector.resources[0]["deployment.environment"] == "test"
    # The same client fed the Redis metrics.
    assert (
        registry.get_sample_value(
            "activity_redis_command_duration_seconds_count", {"command": "SET"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "activity_redis_command_duration_seconds_count", {"command": "PIPELINE"}
        )
        == 1
    )


async def test_error_statuses_on_spans(
    traced_server: Any, provider: TracerProvider, receiver: tuple[Receiver, int]
) -> None:
    channel, _, _ = traced_server
    collector, _ = receiver
    with pytest.raises(grpc.aio.AioRpcError):
        await _create(channel)(pb.EventRequest(id=-1, deployment_id=1), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await _create(channel)(pb.EventRequest(id=1, deployment_id=1, message="explode"), timeout=5)
    assert await _flushed(provider, collector, lambda r: len(r.named(f"{SERVICE}/Create")) == 2)
    by_code = {
        attributes(s)["rpc.grpc.status_code"]: s for s in collector.named(f"{SERVICE}/Create")
    }
    invalid = by_code[grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    unknown = by_code[grpc.StatusCode.INTERNAL.value[0]]
    # A client's mistake is not a server error; an unexpected exception is.
    assert invalid.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert unknown.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert any(e.name == "exception" for e in unknown.events)
    # Without a traceparent each call is its own trace.
    assert invalid.trace_id != unknown.trace_id
    assert not invalid.parent_span_id


async def test_follow_stream_span_ends_at_caught_up_and_live_batches_are_linked(
    traced_server: Any, provider: TracerProvider, receiver: tuple[Receiver, int]
) -> None:
    channel, probe, _ = traced_server
    collector, _ = receiver
    watch = channel.unary_stream(
        f"/{SERVICE}/Watch",
        request_serializer=pb.WatchEventsRequest.SerializeToString,
        response_deserializer=pb.WatchEventsResponse.FromString,
    )
    call = watch(pb.WatchEventsRequest(deployment_id=3, follow=True), timeout=20)
    assert len((await asyncio.wait_for(call.read(), 5)).events) == 1
    assert (await asyncio.wait_for(call.read(), 5)).caught_up
    # The RPC span is exported while the stream is still open.
    assert await _flushed(provider, collector, lambda r: len(r.named(f"{SERVICE}/Watch")) == 1)
    (rpc_span,) = collector.named(f"{SERVICE}/Watch")
    assert attributes(rpc_span)["activity.stream.continues"] is True
    assert "rpc.grpc.status_code" not in attributes(rpc_span)
    history_reads = [s for s in collector.spans if s.parent_span_id == rpc_span.span_id]
    assert [s.name for s in history_reads] == ["GET"]

    for number in (7, 8):
        probe.live.put_nowait(number)
        assert len((await asyncio.wait_for(call.read(), 5)).events) == 2
    probe.live.put_nowait(-1)
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
    assert await _flushed(
        provider, collector, lambda r: len(r.named(f"{SERVICE}/Watch/deliver")) == 2
    )
    for delivery in collector.named(f"{SERVICE}/Watch/deliver"):
        assert delivery.trace_id != rpc_span.trace_id  # short traces, not one of hours
        assert [link.span_id for link in delivery.links] == [rpc_span.span_id]
        assert attributes(delivery)["activity.events"] == 2


async def test_stream_span_is_capped(
    provider: TracerProvider, receiver: tuple[Receiver, int], redis_server: RedisProcess
) -> None:
    collector, _ = receiver

    async def history_forever(request: Any, context: Any) -> AsyncIterator[Any]:
        yield pb.WatchEventsResponse(events=[pb.StoredEvent(cursor="1-0")])
        await asyncio.sleep(0.6)  # no caught_up yet: only the cap can end the span
        yield pb.WatchEventsResponse(events=[pb.StoredEvent(cursor="2-0")])

    client = redis_asyncio.Redis.from_url(redis_server.url, socket_timeout=5)
    probe = TracedProbe(client)
    probe.watch = history_forever  # type: ignore[method-assign,assignment]
    server, pipeline = traced_grpc_server(
        probe, ServerTracing(provider, stream_span_cap_seconds=0.2)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        server_calls = channel.unary_stream(
            f"/{SERVICE}/Watch",
            request_serializer=pb.WatchEventsRequest.SerializeToString,
            response_deserializer=pb.WatchEventsResponse.FromString,
        )
        call = server_calls(pb.WatchEventsRequest(deployment_id=1, follow=True), timeout=10)
        await asyncio.wait_for(call.read(), 5)
        assert await _flushed(provider, collector, lambda r: len(r.named(f"{SERVICE}/Watch")) == 1)
        (span,) = collector.named(f"{SERVICE}/Watch")
        duration = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
        assert 0.15 < duration < 0.55
        call.cancel()
    finally:
        await channel.close()
        await server.stop(grace=None)
        await pipeline.watchdog.stop()
        await client.aclose()
        shutdown_tracing(provider)


async def test_health_is_not_traced(
    traced_server: Any, provider: TracerProvider, receiver: tuple[Receiver, int]
) -> None:
    channel, _, _ = traced_server
    collector, _ = receiver
    stub = health_pb2_grpc.HealthStub(channel)
    assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1
    await _create(channel)(pb.EventRequest(id=1, deployment_id=1), timeout=5)
    assert await _flushed(provider, collector, lambda r: len(r.named(f"{SERVICE}/Create")) == 1)
    assert not [s for s in collector.spans if "Health" in s.name]


async def test_background_redis_commands_make_no_spans(
    traced_server: Any, provider: TracerProvider, receiver: tuple[Receiver, int]
) -> None:
    _, probe, registry = traced_server
    collector, _ = receiver
    await probe.client.ping()
    await probe.client.xread({"probe:stream": "$"}, block=50)  # what the hub does
    await probe.client.set("after", "x")
    with provider.get_tracer("test").start_as_current_span("parent"):
        await probe.client.get("after")
    assert await _flushed(provider, collector, lambda r: len(r.named("parent")) == 1)
    assert [s.name for s in collector.spans] == ["GET", "parent"]
    assert (
        registry.get_sample_value(
            "activity_redis_command_duration_seconds_count", {"command": "PING"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "activity_redis_command_duration_seconds_count", {"command": "XREAD"}
        )
        is None
    )  # blocking reads are not timed


async def test_redis_errors_are_counted(redis_server: RedisProcess) -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, runtime=False)
    client = instrument_redis(
        redis_asyncio.Redis.from_url(redis_server.url, socket_timeout=5), metrics
    )
    try:
        await client.set("text", "x")
        with pytest.raises(redis_asyncio.ResponseError):
            await client.incr("text")
    finally:
        await client.aclose()
    # redis-py sends INCR as INCRBY; the label is the command Redis received.
    assert (
        registry.get_sample_value(
            "activity_redis_command_errors_total", {"command": "INCRBY", "error": "ResponseError"}
        )
        == 1
    )


def test_tracing_is_off_without_an_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert configure_tracing(set_global=False) is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    assert configure_tracing(set_global=False) is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert configure_tracing(set_global=False) is None


def test_with_tracing_off_only_calls_carrying_a_trace_context_get_a_span() -> None:
    """No SDK provider: a call without trace context gets no span (nothing could
    record it); one with a traceparent does, so its logs carry that trace id."""
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    tracing = ServerTracing()
    assert not tracing.recording
    peer = "ipv4:127.0.0.1:5"
    assert tracing.start(SERVICE, "Create", (), peer) is None
    assert tracing.start(SERVICE, "Create", (("x-other", "1"),), peer) is None
    parent = (("traceparent", f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"),)
    span = tracing.start(SERVICE, "Create", parent, peer)
    assert span is not None
    assert trace.format_trace_id(span.span.get_span_context().trace_id) == CLIENT_TRACE_ID
    # With a provider of its own it always makes one.
    assert ServerTracing(TracerProvider()).start(SERVICE, "Create", (), peer) is not None


def test_protocol_and_resource_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    built = configure_tracing(set_global=False)
    assert built is not None
    try:
        processor = built._active_span_processor._span_processors[0]
        exporter = processor._batch_processor._exporter  # type: ignore[attr-defined]
        assert type(exporter).__module__.endswith("http.trace_exporter")
    finally:
        built.shutdown()
    assert build_resource().attributes["service.name"] == "activity-events"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "custom")
    assert build_resource().attributes["service.name"] == "custom"


# --------------------------------------------------------------------------- the real server


@pytest.mark.slow
async def test_real_server_process_exports_spans_joining_the_cli_trace(
    receiver: tuple[Receiver, int],
    redis_server: RedisProcess,
    server_process_factory: Any,
) -> None:
    """``activity-server`` configured by OTEL_* only; ``activity-client -add`` with TRACEPARENT."""
    collector, port = receiver
    server = server_process_factory(
        {
            "ACTIVITY_REDIS_URL": redis_server.url,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    await asyncio.to_thread(server.start)
    client = Path(sys.executable).with_name("activity-client")
    env = {**os.environ, "TRACEPARENT": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"}
    added = await asyncio.create_subprocess_exec(
        str(client), "-port", str(server.port), "-add",
        '{"id": 1, "deployment_id": 5, "message": "Deployment has been created successfully"}',
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(added.communicate(), 30)
    assert added.returncode == 0, output

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = pb_grpc.ActivityEventsStub(channel)
        follow = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=5, follow=True), timeout=30)
        while not (await asyncio.wait_for(follow.read(), 5)).caught_up:
            pass
        await stub.CreateEvent(pb.EventRequest(id=2, deployment_id=5, message="live"), timeout=5)
        assert (await asyncio.wait_for(follow.read(), 5)).events
        # The follow span is exported while the stream is still open.
        assert await wait_for(
            lambda: collector.named("activityevents.ActivityEvents/WatchEvents"), timeout=10
        )
        follow.cancel()
    finally:
        await channel.close()
    await asyncio.to_thread(server.stop)

    assert await wait_for(
        lambda: collector.named("activityevents.ActivityEvents/WatchEvents/deliver"), timeout=10
    )
    creates = collector.named("activityevents.ActivityEvents/CreateEvent")
    from_cli = [s for s in creates if s.trace_id.hex() == CLIENT_TRACE_ID]
    assert len(from_cli) == 1, [s.trace_id.hex() for s in creates]
    (cli_span,) = from_cli
    assert cli_span.parent_span_id.hex() == CLIENT_SPAN_ID
    assert attributes(cli_span)["rpc.grpc.status_code"] == 0
    assert attributes(cli_span)["activity.deployment_id"] == 5
    redis_children = [s for s in collector.spans if s.parent_span_id == cli_span.span_id]
    assert redis_children, "no Redis spans under the CreateEvent span"
    assert all(attributes(s)["db.system"] == "redis" for s in redis_children)

    (watch,) = collector.named("activityevents.ActivityEvents/WatchEvents")
    assert attributes(watch)["activity.stream.continues"] is True
    for delivery in collector.named("activityevents.ActivityEvents/WatchEvents/deliver"):
        assert [link.span_id for link in delivery.links] == [watch.span_id]

    names = {s.name for s in collector.spans}
    assert not [n for n in names if "Health" in n or "Reflection" in n], names
    assert "XREAD" not in names  # the hub's blocking reads make no spans
    assert {r["service.name"] for r in collector.resources} == {"activity-events"}
