"""A throwaway gRPC service with all four RPC types, for testing the call pipeline on a real server.

The pipeline must work for any handler, not only the service's own, so its
observability tests run it on a real ``grpc.aio`` server (port 0) serving this
``probe.Probe`` service next to the real health servicer. Requests and
responses are ``google.protobuf.StringValue``; the request's value tells the
handler what to do:

- ``"ok"``: answer normally (streams send ``n`` messages for ``"ok:n"``);
- ``"abort:CODE"``: ``context.abort`` with ``grpc.StatusCode.CODE`` (streams
  after one message);
- ``"raise"``: raise an unexpected exception (the pipeline answers INTERNAL);
- ``"hang"``: wait (bounded, 30 s) so the client can cancel or time out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from activity_events.app.settings import Settings
from activity_events.grpc.admission import Admission, CallClass
from activity_events.grpc.health import POLICIES as HEALTH_POLICIES
from activity_events.grpc.pipeline import Pipeline, Policy
from activity_events.grpc.watchdog import StreamWatchdog
from activity_events.observability.grpc_metrics import GrpcServerMetrics
from activity_events.observability.tracing import ServerTracing

SERVICE = "probe.Probe"
HANG_SECONDS = 30.0


def _probe_descriptor() -> ServiceDescriptor:
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName(SERVICE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto(
        name="tests/probe.proto", package="probe", syntax="proto3"
    )
    proto.dependency.append("google/protobuf/wrappers.proto")
    service = proto.service.add(name="Probe")
    for name, client_streaming, server_streaming in METHODS:
        service.method.add(
            name=name,
            input_type=".google.protobuf.StringValue",
            output_type=".google.protobuf.StringValue",
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
    pool.Add(proto)
    return pool.FindServiceByName(SERVICE)


METHODS = (
    ("Unary", False, False),
    ("ServerStream", False, True),
    ("ClientStream", True, False),
    ("Bidi", True, True),
)


def _count(value: str) -> int:
    return int(value.split(":", 1)[1]) if value.startswith("ok:") else 1


async def _act(value: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Do what ``value`` asks before answering."""
    if value.startswith("abort:"):
        await context.abort(grpc.StatusCode[value.split(":", 1)[1]], "asked to abort")
    if value == "raise":
        raise RuntimeError("asked to raise")
    if value == "hang":
        await asyncio.sleep(HANG_SECONDS)


async def _unary(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
    await _act(request.value, context)
    return wrappers_pb2.StringValue(value="done")


async def _server_stream(
    request: wrappers_pb2.StringValue, context: Any
) -> AsyncIterator[wrappers_pb2.StringValue]:
    if request.value in {"hang", "raise"} or request.value.startswith("abort:"):
        yield wrappers_pb2.StringValue(value="first")
    await _act(request.value, context)
    for index in range(_count(request.value)):
        yield wrappers_pb2.StringValue(value=str(index))


async def _client_stream(
    requests: AsyncIterator[wrappers_pb2.StringValue], context: Any
) -> wrappers_pb2.StringValue:
    values = [request.value async for request in requests]
    for value in values:
        await _act(value, context)
    return wrappers_pb2.StringValue(value=str(len(values)))


async def _bidi(
    requests: AsyncIterator[wrappers_pb2.StringValue], context: Any
) -> AsyncIterator[wrappers_pb2.StringValue]:
    async for request in requests:
        await _act(request.value, context)
        yield wrappers_pb2.StringValue(value=request.value)


def probe_handlers() -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The ``probe.Probe`` handlers (async, streaming ones as async generators)."""
    _probe_descriptor()
    kwargs = {
        "request_deserializer": wrappers_pb2.StringValue.FromString,
        "response_serializer": wrappers_pb2.StringValue.SerializeToString,
    }
    return {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, **kwargs),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream, **kwargs),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream, **kwargs),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, **kwargs),
    }


PROBE_POLICIES = {name: Policy(CallClass.READS, role=None) for name, _, _ in METHODS}
"""Open, in the reads budget: the probe tests observability, not auth or admission."""


def probe_services() -> list[ServiceDescriptor]:
    """Descriptors of the services the probe server serves (for metric initialisation)."""
    return [_probe_descriptor(), health_pb2.DESCRIPTOR.services_by_name["Health"]]


class ProbeServer:
    """A started aio server with the probe service and the real health servicer,
    every method registered through the call pipeline (metrics on ``registry``,
    spans through ``tracing``)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        tracing: ServerTracing | None = None,
        stall_seconds: float = 30.0,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.pipeline = Pipeline(
            admission=Admission(Settings()),
            metrics=GrpcServerMetrics(self.registry),
            watchdog=StreamWatchdog(stall_seconds),
            tracing=tracing,
        )
        self.health = health.aio.HealthServicer()
        self.pipeline.add(
            self.server,
            health_pb2_grpc.add_HealthServicer_to_server,
            self.health,
            HEALTH_POLICIES,
        )
        self.pipeline.add_handlers(self.server, SERVICE, probe_handlers(), PROBE_POLICIES)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> ProbeServer:
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.server.stop(grace=1.0)
        await self.pipeline.watchdog.stop()

    def call(self, method: str, streaming_request: bool, streaming_response: bool) -> Any:
        """A multicallable for ``probe.Probe/<method>`` on this server."""
        assert self.channel is not None
        path = f"/{SERVICE}/{method}"
        kwargs = {
            "request_serializer": wrappers_pb2.StringValue.SerializeToString,
            "response_deserializer": wrappers_pb2.StringValue.FromString,
        }
        if streaming_request and streaming_response:
            return self.channel.stream_stream(path, **kwargs)
        if streaming_request:
            return self.channel.stream_unary(path, **kwargs)
        if streaming_response:
            return self.channel.unary_stream(path, **kwargs)
        return self.channel.unary_unary(path, **kwargs)

    def health_stub(self) -> health_pb2_grpc.HealthStub:
        assert self.channel is not None
        return health_pb2_grpc.HealthStub(self.channel)


def value(text: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=text)


async def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate()`` every 20 ms until true or ``timeout`` seconds passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())
