"""grpc.aio server interceptors: Go-compatible Prometheus metrics and an access log.

Operators run this service next to Go gRPC services and reuse their
dashboards, so :class:`GrpcMetricsInterceptor` exports exactly what
go-grpc-prometheus exports: the same metric names, help texts, label names
(``grpc_type``, ``grpc_service``, ``grpc_method``, ``grpc_code``) and label
values (``grpc_code`` in Go's CamelCase, ``grpc_type`` one of ``unary``,
``client_stream``, ``server_stream``, ``bidi_stream``). Existing Python
interceptors name or label these differently or miss streaming RPCs.

Both interceptors wrap the handler that grpc resolved; they never replace
the servicer. Streaming handlers must be async generators (the service's
are); a streaming handler written in the ``context.write`` style still works
but its sent messages are not counted. A stream counts as handled when it
ends normally, with an error, or by cancellation (``Canceled``, or
``DeadlineExceeded`` when its deadline passed).

Use as ``grpc.aio.server(interceptors=[metrics, tracing, access_log])``: the
first is outermost, so metrics time everything and the access log line is
written inside the RPC's span (it then carries the span's trace id).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("activity_events.access")
"""Access-log lines go to their own logger so operators can route or silence them."""

GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
"""gRPC status codes as Go's ``codes.Code.String()`` spells them (note ``Canceled``)."""

UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = (
    "unary",
    "client_stream",
    "server_stream",
    "bidi_stream",
)

QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                            "grpc.reflection.v1.ServerReflection"})  # fmt: skip
"""Infrastructure services: probed every few seconds, so logged at DEBUG and not traced."""


def grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The go-grpc-prometheus ``grpc_type`` of a method."""
    if client_streaming and server_streaming:
        return BIDI_STREAM
    if client_streaming:
        return CLIENT_STREAM
    if server_streaming:
        return SERVER_STREAM
    return UNARY


def split_method(full_method: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service or "unknown", method or "unknown")


def status_of(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
) -> grpc.StatusCode:
    """The status an RPC ended with, as the client will see it.

    ``context.abort()`` raises after setting the code; a handler may also set
    a code and return; cancellation (client gone, deadline passed) raises
    ``CancelledError`` inside the handler; any other exception becomes
    UNKNOWN, as grpc itself answers.
    """
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    if error is None:
        return grpc.StatusCode.OK
    return grpc.StatusCode.UNKNOWN


@dataclass(frozen=True, slots=True)
class RpcInfo:
    """What is known about an RPC before its handler runs."""

    service: str
    method: str
    type: str
    metadata: tuple[tuple[str, str | bytes], ...]

    @property
    def full_method(self) -> str:
        return f"/{self.service}/{self.method}"


class RpcObserver(Protocol):
    """Callbacks for one RPC: messages in and out, then exactly one ``end``."""

    def request(self, message: Any) -> None: ...

    def response(self, message: Any) -> None: ...

    def end(self, code: grpc.StatusCode, error: BaseException | None) -> None: ...


ObserverFactory = Callable[[RpcInfo, grpc.aio.ServicerContext[Any, Any]], RpcObserver | None]


def observe_handler(
    handler: grpc.RpcMethodHandler[Any, Any], info: RpcInfo, make_observer: ObserverFactory
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of ``handler`` whose behaviour reports to an observer made per call.

    The observer sees each request and response message as it passes and
    one ``end`` with the final status, including when the call is cancelled
    while suspended in the handler.
    """

    behaviour: Any

    def finish(observer: RpcObserver, context: Any, error: BaseException | None) -> None:
        try:
            observer.end(status_of(context, error), error)
        except Exception:
            logger.exception("RPC observer failed for %s", info.full_method)

    async def counted(requests: AsyncIterator[Any], observer: RpcObserver) -> AsyncIterator[Any]:
        async for message in requests:
            observer.request(message)
            yield message

    if not handler.request_streaming and not handler.response_streaming:
        behaviour = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            observer = make_observer(info, context)
            if observer is None:
                return await behaviour(request, context)
            observer.request(request)
            try:
                response = await behaviour(request, context)
            except BaseException as error:
                finish(observer, context, error)
                raise
            if response is not None and status_of(context, None) == grpc.StatusCode.OK:
                observer.response(response)
            finish(observer, context, None)
            return response

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )

    if not handler.request_streaming:
        behaviour = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            observer = make_observer(info, context)
            if observer is None:
                async for message in _responses(behaviour(request, context)):
                    yield message
                return
            observer.request(request)
            try:
                async for message in _responses(behaviour(request, context)):
                    observer.response(message)
                    yield message
            except BaseException as error:
                finish(observer, context, error)
                raise
            finish(observer, context, None)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )

    if not handler.response_streaming:
        behaviour = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
            observer = make_observer(info, context)
            if observer is None:
                return await behaviour(requests, context)
            try:
                response = await behaviour(counted(requests, observer), context)
            except BaseException as error:
                finish(observer, context, error)
                raise
            if response is not None and status_of(context, None) == grpc.StatusCode.OK:
                observer.response(response)
            finish(observer, context, None)
            return response

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )

    behaviour = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        observer = make_observer(info, context)
        if observer is None:
            async for message in _responses(behaviour(requests, context)):
                yield message
            return
        try:
            async for message in _responses(behaviour(counted(requests, observer), context)):
                observer.response(message)
                yield message
        except BaseException as error:
            finish(observer, context, error)
            raise
        finish(observer, context, None)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


async def _responses(result: Any) -> AsyncIterator[Any]:
    """Iterate a streaming handler's result: an async generator, or a coroutine using write()."""
    if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
        async for message in result:
            yield message
    elif inspect.isawaitable(result):
        await result


async def resolve(
    continuation: Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ],
    details: grpc.HandlerCallDetails,
) -> tuple[grpc.RpcMethodHandler[Any, Any] | None, RpcInfo | None]:
    """The next handler in the chain and what we know about the call (None when unknown)."""
    handler = await continuation(details)
    if handler is None:
        return None, None
    service, method = split_method(details.method)
    info = RpcInfo(
        service=service,
        method=method,
        type=grpc_type(handler.request_streaming, handler.response_streaming),
        metadata=tuple(details.invocation_metadata or ()),
    )
    return handler, info


# --------------------------------------------------------------------------- metrics


class _MetricsObserver:
    __slots__ = ("_labels", "_metrics", "_started")

    def __init__(self, metrics: GrpcMetricsInterceptor, info: RpcInfo) -> None:
        self._metrics = metrics
        self._labels = (info.type, info.service, info.method)
        self._started = time.perf_counter()
        metrics.started.labels(*self._labels).inc()

    def request(self, message: Any) -> None:
        self._metrics.msg_received.labels(*self._labels).inc()

    def response(self, message: Any) -> None:
        self._metrics.msg_sent.labels(*self._labels).inc()

    def end(self, code: grpc.StatusCode, error: BaseException | None) -> None:
        self._metrics.handled.labels(*self._labels, GO_CODE_NAMES[code]).inc()
        self._metrics.handling_seconds.labels(*self._labels).observe(
            time.perf_counter() - self._started
        )


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """go-grpc-prometheus server metrics on ``registry``.

    ``services`` are the protobuf service descriptors the server serves
    (``pb.DESCRIPTOR.services_by_name["ActivityEvents"]``, health,
    reflection): every method of each gets all its series at zero at once,
    as ``grpc_prometheus.Register(server)`` does in Go, so ``rate()`` and
    alert expressions see a series before the first call or error. Help
    texts and the default histogram buckets are Go's.
    """

    def __init__(
        self, registry: CollectorRegistry, services: Iterable[ServiceDescriptor] = ()
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # Go exposes no `*_created` series
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server.",
            labels,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server.",
            labels,
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            labels,
            registry=registry,
        )
        for service in services:
            self.initialize(service)

    def initialize(self, service: ServiceDescriptor) -> None:
        """Create every series of every method of ``service`` at zero."""
        for method in service.methods:
            labels = (
                grpc_type(method.client_streaming, method.server_streaming),
                service.full_name,
                method.name,
            )
            self.started.labels(*labels)
            self.msg_received.labels(*labels)
            self.msg_sent.labels(*labels)
            self.handling_seconds.labels(*labels)
            for code in GO_CODE_NAMES.values():
                self.handled.labels(*labels, code)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler, info = await resolve(continuation, handler_call_details)
        if handler is None or info is None:
            return handler  # type: ignore[return-value]  # unknown method: grpc answers UNIMPLEMENTED
        return observe_handler(handler, info, lambda rpc, _context: _MetricsObserver(self, rpc))


# --------------------------------------------------------------------------- access log

_MAX_LOGGED_DEPLOYMENTS = 10
_MAX_SCANNED_EVENTS = 64


def deployment_ids(message: Any) -> list[int]:
    """Deployment ids a request names: its ``deployment_id``, a ``Deployment``'s ``id``,
    or those of the events in a batch (first few, without repeats)."""
    if not isinstance(message, Message):
        return []
    fields = message.DESCRIPTOR.fields_by_name
    if "deployment_id" in fields:
        return [int(message.deployment_id)]  # type: ignore[attr-defined]
    if message.DESCRIPTOR.name == "Deployment" and "id" in fields:
        return [int(message.id)]  # type: ignore[attr-defined]
    if "events" in fields and fields["events"].message_type is not None:
        seen: list[int] = []
        # A few leading events tell whom a batch is about; walking all of a
        # 1,000-event batch would cost more than logging is worth.
        for event in itertools.islice(message.events, _MAX_SCANNED_EVENTS):  # type: ignore[attr-defined]
            for found in deployment_ids(event):
                if found not in seen:
                    seen.append(found)
            if len(seen) >= _MAX_LOGGED_DEPLOYMENTS:
                break
        return seen
    return []


class _AccessObserver:
    __slots__ = ("_deployments", "_info", "_peer", "_quiet", "_received", "_sent", "_started")

    def __init__(self, info: RpcInfo, peer: str, quiet: bool) -> None:
        self._info = info
        self._quiet = quiet
        self._peer = peer
        self._started = time.perf_counter()
        self._deployments: list[int] | None = None
        self._received = 0
        self._sent = 0

    def request(self, message: Any) -> None:
        self._received += 1
        if self._deployments is None:
            self._deployments = deployment_ids(message)

    def response(self, message: Any) -> None:
        self._sent += 1

    def end(self, code: grpc.StatusCode, error: BaseException | None) -> None:
        fields: dict[str, Any] = {
            "grpc_service": self._info.service,
            "grpc_method": self._info.method,
            "grpc_type": self._info.type,
            "grpc_code": GO_CODE_NAMES[code],
            "duration_seconds": round(time.perf_counter() - self._started, 6),
            "peer": self._peer,
            "msg_received": self._received,
            "msg_sent": self._sent,
        }
        deployments = self._deployments or []
        if len(deployments) == 1:
            fields["deployment_id"] = deployments[0]
        elif deployments:
            fields["deployment_ids"] = deployments
        if error is not None and code == grpc.StatusCode.UNKNOWN:
            fields["error"] = f"{type(error).__name__}: {error}"
        level = logging.DEBUG if self._quiet else logging.INFO
        access_logger.log(
            level,
            "%s %s %.1f ms",
            self._info.full_method,
            fields["grpc_code"],
            fields["duration_seconds"] * 1000,
            extra=fields,
        )


class AccessLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """One log line per RPC on logger ``activity_events.access``, written when the RPC ends.

    Extra fields: ``grpc_service``, ``grpc_method``, ``grpc_type``,
    ``grpc_code`` (Go spelling), ``duration_seconds``, ``peer``,
    ``deployment_id`` (or ``deployment_ids`` for a batch naming several),
    ``msg_received``, ``msg_sent`` and, for an unexpected exception,
    ``error``. Health and reflection calls log at DEBUG so probes do not
    drown the log.
    """

    def __init__(self, quiet_services: Sequence[str] = tuple(QUIET_SERVICES)) -> None:
        self._quiet = frozenset(quiet_services)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler, info = await resolve(continuation, handler_call_details)
        if handler is None or info is None:
            return handler  # type: ignore[return-value]
        return observe_handler(
            handler,
            info,
            lambda rpc, context: _AccessObserver(rpc, context.peer(), rpc.service in self._quiet),
        )
