"""OpenTelemetry traces: SDK set-up from ``OTEL_*``, a server span per RPC, Redis child spans.

Configuration is only the standard environment variables, so the service
plugs into whatever collector a cluster runs without settings of its own:
``OTEL_SERVICE_NAME`` (default ``activity-events``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``,
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``..._PROTOCOL`` (``grpc`` or
``http/protobuf``), ``..._HEADERS``, ``..._INSECURE``, ``OTEL_BSP_*``,
``OTEL_PROPAGATORS``, ``OTEL_SDK_DISABLED``. Tracing is on only when an
exporter is configured: ``OTEL_TRACES_EXPORTER=otlp`` or an OTLP endpoint
variable. Otherwise nothing is set up and the no-op API costs next to nothing.

Spans made here:

- one SERVER span per RPC (:class:`TracingInterceptor`), named
  ``package.Service/Method``, with ``rpc.system``, ``rpc.service``,
  ``rpc.method``, ``rpc.grpc.status_code`` and the peer; a W3C
  ``traceparent`` in the request metadata becomes its parent. Health and
  reflection calls are not traced (probes would flood the backend).
- a follow stream (WatchEvents with ``follow``) may run for hours; its span
  ends when the history is sent (the response with ``caught_up``) or after
  :data:`STREAM_SPAN_CAP_SECONDS`, and every live message after that gets a
  short ``.../deliver`` span of its own trace, linked to the RPC span.
- one CLIENT span per Redis command or pipeline (:func:`instrument_redis`),
  only as a child of a span already current: background loops (the hub's
  blocking XREADs, health probes) make none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from activity_events import __version__
from activity_events.observability.grpc_metrics import (
    QUIET_SERVICES,
    RpcInfo,
    deployment_ids,
    resolve,
    split_method,
    status_of,
)
from activity_events.pb import activityevents_pb2 as pb

logger = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "activity-events"
INSTRUMENTATION_NAME = "activity_events"

STREAM_SPAN_CAP_SECONDS = 60.0
"""Longest a streaming RPC's span stays open; later messages get their own short spans."""

_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""Codes that mark a server span as an error (OpenTelemetry's gRPC conventions); the
others (InvalidArgument, NotFound...) are the client's mistake, not the server's."""


_CAUGHT_UP = pb.WatchEventsResponse(caught_up=True).SerializeToString()
"""The servicer sends pre-serialised responses; this is the "history done" marker in bytes."""


def _is_caught_up(message: Any) -> bool:
    """Whether a streamed response marks the end of a follow stream's history phase."""
    if isinstance(message, bytes):
        return message == _CAUGHT_UP
    return getattr(message, "caught_up", False) is True


# --------------------------------------------------------------------------- set-up


def _exporter_from_env() -> SpanExporter | None:
    """The OTLP exporter the environment asks for, or None when tracing is off."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()}
    endpoint_set = bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if "none" in names or (not names and not endpoint_set):
        return None
    unsupported = names - {"otlp"}
    if unsupported:
        # "console" would print spans to stdout, which must carry JSON log lines only.
        logger.warning("Ignoring unsupported OTEL_TRACES_EXPORTER values: %s", sorted(unsupported))
        if "otlp" not in names and not endpoint_set:
            return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    logger.warning("Unsupported OTLP protocol %r; tracing stays off", protocol)
    return None


def build_resource(version: str = __version__) -> Resource:
    """Resource from ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` over our defaults."""
    detected = Resource.create({"service.version": version})
    name = str(detected.attributes.get("service.name", ""))
    if not name or name.startswith("unknown_service"):
        detected = detected.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return detected


def configure_tracing(
    version: str = __version__, exporter: SpanExporter | None = None, set_global: bool = True
) -> TracerProvider | None:
    """Set up the SDK from the environment; None (and nothing set up) when tracing is off.

    Call once at start-up after logs are configured. ``exporter`` overrides
    the one the environment names (tests). With ``set_global`` the provider
    becomes the process-wide one, so ``trace.get_tracer`` anywhere uses it;
    the sampler comes from ``OTEL_TRACES_SAMPLER`` (default: parent-based,
    always on). Pass the returned provider to :func:`shutdown_tracing` at exit.
    """
    exporter = exporter if exporter is not None else _exporter_from_env()
    if exporter is None:
        logger.info("Tracing is off (no OTEL_TRACES_EXPORTER or OTLP endpoint configured)")
        return None
    provider = TracerProvider(resource=build_resource(version))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    logger.info(
        "Tracing to %s as %s",
        type(exporter).__module__.rsplit(".", 2)[-2],
        provider.resource.attributes.get("service.name"),
    )
    return provider


def shutdown_tracing(provider: TracerProvider | None, timeout_seconds: float = 5.0) -> None:
    """Export what is buffered, then stop (bounded by ``timeout_seconds``)."""
    if provider is None:
        return
    try:
        provider.force_flush(int(timeout_seconds * 1000))
        provider.shutdown()
    except Exception:
        logger.warning("Tracing did not shut down cleanly", exc_info=True)


def _tracer(provider: trace.TracerProvider | None) -> trace.Tracer:
    if provider is None:
        return trace.get_tracer(INSTRUMENTATION_NAME, __version__)
    return provider.get_tracer(INSTRUMENTATION_NAME, __version__)


# --------------------------------------------------------------------------- server


def _peer_attributes(peer: str) -> dict[str, Any]:
    """``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5`` -> network.peer.address/port."""
    kind, _, rest = peer.partition(":")
    if kind not in {"ipv4", "ipv6"}:
        return {}
    host, _, port = rest.rpartition(":")
    attributes: dict[str, Any] = {"network.peer.address": host.strip("[]")}
    if port.isdigit():
        attributes["network.peer.port"] = int(port)
    return attributes


def _metadata_carrier(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    return {key.lower(): value for key, value in metadata if isinstance(value, str)}


class _RpcSpan:
    """The server span of one RPC and the rules for when it ends."""

    def __init__(self, tracer: trace.Tracer, info: RpcInfo, context: Any) -> None:
        self.tracer = tracer
        self.info = info
        parent = propagate.extract(_metadata_carrier(info.metadata))
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": info.service,
            "rpc.method": info.method,
        }
        attributes.update(_peer_attributes(context.peer()))
        self.span = tracer.start_span(
            f"{info.service}/{info.method}", context=parent, kind=SpanKind.SERVER,
            attributes=attributes,
        )  # fmt: skip
        self.context = trace.set_span_in_context(self.span, parent)
        self.started = time.monotonic()
        self.open = True
        self.timer: asyncio.TimerHandle | None = None

    def note_request(self, message: Any) -> None:
        found = deployment_ids(message)
        if len(found) == 1:
            self.span.set_attribute("activity.deployment_id", found[0])

    def close(
        self, code: grpc.StatusCode, error: BaseException | None, early: bool = False
    ) -> None:
        """End the span with the RPC's status, or as "still streaming" when ``early``."""
        if not self.open:
            return
        self.open = False
        if self.timer is not None:
            self.timer.cancel()
        if early:
            self.span.set_attribute("activity.stream.continues", True)
        else:
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _ERROR_CODES:
                self.span.set_status(Status(StatusCode.ERROR, code.name))
            expected = grpc.aio.AbortError | asyncio.CancelledError | GeneratorExit
            if error is not None and not isinstance(error, expected):
                self.span.record_exception(error)
        self.span.end()


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A SERVER span per RPC; the handler runs with it as the current span.

    ``tracer_provider`` defaults to the global one (set by
    :func:`configure_tracing`); ``skip_services`` are not traced (health and
    reflection). See the module docstring for long streams.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        skip_services: Iterable[str] = QUIET_SERVICES,
        stream_span_cap_seconds: float = STREAM_SPAN_CAP_SECONDS,
    ) -> None:
        self._tracer = _tracer(tracer_provider)
        self._own_provider = tracer_provider is not None
        self._skip = frozenset(skip_services)
        self._cap = stream_span_cap_seconds

    def _carries_nothing(self, metadata: Any) -> bool:
        """True when no span could record (no SDK provider, tracing is off) and the
        caller sent no trace context: the call then runs unwrapped. With a
        context it is still wrapped, so logs carry the caller's trace id."""
        if self._own_provider or isinstance(trace.get_tracer_provider(), TracerProvider):
            return False
        fields = propagate.get_global_textmap().fields
        return not any(key in fields for key, _ in metadata or ())

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, _ = split_method(handler_call_details.method)
        if service in self._skip or self._carries_nothing(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler, info = await resolve(continuation, handler_call_details)
        if handler is None or info is None:
            return handler  # type: ignore[return-value]
        return self._wrap(handler, info)

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], info: RpcInfo
    ) -> grpc.RpcMethodHandler[Any, Any]:
        tracer, cap = self._tracer, self._cap
        serializers = (handler.request_deserializer, handler.response_serializer)

        async def run_unary(call: Callable[[], Awaitable[Any]], context: Any, rpc: _RpcSpan) -> Any:
            token = otel_context.attach(rpc.context)
            try:
                response = await call()
            except BaseException as error:
                rpc.close(status_of(context, error), error)
                raise
            finally:
                otel_context.detach(token)
            rpc.close(status_of(context, None), None)
            return response

        async def run_stream(
            responses: AsyncIterator[Any], context: Any, rpc: _RpcSpan
        ) -> AsyncIterator[Any]:
            loop = asyncio.get_running_loop()
            rpc.timer = loop.call_later(
                cap, lambda: rpc.close(grpc.StatusCode.OK, None, early=True)
            )
            rpc_link = Link(rpc.span.get_span_context())
            iterator = aiter(responses)
            while True:
                token = otel_context.attach(rpc.context if rpc.open else otel_context.Context())
                try:
                    message = await anext(iterator)
                except StopAsyncIteration:
                    otel_context.detach(token)
                    rpc.close(status_of(context, None), None)
                    return
                except BaseException as error:
                    otel_context.detach(token)
                    rpc.close(status_of(context, error), error)
                    raise
                otel_context.detach(token)
                if rpc.open:
                    if _is_caught_up(message):
                        rpc.close(grpc.StatusCode.OK, None, early=True)
                    yield message
                    continue
                delivery = tracer.start_span(
                    f"{info.service}/{info.method}/deliver",
                    context=otel_context.Context(),
                    kind=SpanKind.INTERNAL,
                    links=[rpc_link],
                    attributes={"rpc.service": info.service, "rpc.method": info.method},
                )
                if isinstance(message, bytes):
                    delivery.set_attribute("rpc.message.uncompressed_size", len(message))
                else:
                    events = getattr(message, "events", None)
                    if events is not None:
                        delivery.set_attribute("activity.events", len(events))
                try:
                    yield message
                finally:
                    delivery.end()

        async def counted(requests: AsyncIterator[Any], rpc: _RpcSpan) -> AsyncIterator[Any]:
            first = True
            async for message in requests:
                if first:
                    rpc.note_request(message)
                    first = False
                yield message

        if not handler.request_streaming and not handler.response_streaming:
            behaviour: Any = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                rpc = _RpcSpan(tracer, info, context)
                rpc.note_request(request)
                return await run_unary(lambda: behaviour(request, context), context, rpc)

            return grpc.unary_unary_rpc_method_handler(unary_unary, *serializers)

        if not handler.request_streaming:
            behaviour = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                rpc = _RpcSpan(tracer, info, context)
                rpc.note_request(request)
                token = otel_context.attach(rpc.context)
                try:
                    responses = behaviour(request, context)
                finally:
                    otel_context.detach(token)
                async for message in run_stream(responses, context, rpc):
                    yield message

            return grpc.unary_stream_rpc_method_handler(unary_stream, *serializers)

        if not handler.response_streaming:
            behaviour = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
                rpc = _RpcSpan(tracer, info, context)
                return await run_unary(
                    lambda: behaviour(counted(requests, rpc), context), context, rpc
                )

            return grpc.stream_unary_rpc_method_handler(stream_unary, *serializers)

        behaviour = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            rpc = _RpcSpan(tracer, info, context)
            responses = behaviour(counted(requests, rpc), context)
            async for message in run_stream(responses, context, rpc):
                yield message

        return grpc.stream_stream_rpc_method_handler(stream_stream, *serializers)


# --------------------------------------------------------------------------- client


def outgoing_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None = None,
) -> list[tuple[str, str | bytes]]:
    """``metadata`` plus ``traceparent``/``tracestate`` of the current span (if any)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*(metadata or ()), *carrier.items()]


class _ClientTracing:
    """Shared logic of the client interceptors: a CLIENT span, propagated in metadata.

    Without a configured SDK the span is not recorded, but a ``traceparent``
    is still sent (a fresh, sampled trace id), so the server's span of the
    call carries a trace id the client can report (:attr:`last_trace_id`).
    """

    last_trace_id: str | None = None

    def __init__(self, tracer_provider: trace.TracerProvider | None) -> None:
        self._tracer = _tracer(tracer_provider)

    def start(self, details: grpc.aio.ClientCallDetails) -> tuple[trace.Span, Any]:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, name = split_method(method)
        span = self._tracer.start_span(
            f"{service}/{name}",
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        span_context = span.get_span_context()
        if not span_context.is_valid:
            span = trace.NonRecordingSpan(_fresh_span_context())
            span_context = span.get_span_context()
        _ClientTracing.last_trace_id = trace.format_trace_id(span_context.trace_id)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [
            (k, v)
            for k, v in (details.metadata or ())
            if k.lower() not in {"traceparent", "tracestate"}
        ]
        metadata.extend(carrier.items())
        new_details = grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=grpc.aio.Metadata(*metadata),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )
        return span, new_details

    @staticmethod
    def finish_when_done(span: trace.Span, call: Any) -> Any:
        """End ``span`` with the call's status once the call is done."""

        async def record(finished: Any) -> None:
            try:
                code = await finished.code()  # the call is done: answers at once
                if isinstance(code, grpc.StatusCode):
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code != grpc.StatusCode.OK:
                        span.set_status(Status(StatusCode.ERROR, code.name))
            finally:
                span.end()

        def done(finished: Any) -> None:
            task = asyncio.get_running_loop().create_task(record(finished))
            _pending.add(task)
            task.add_done_callback(_pending.discard)

        if hasattr(call, "add_done_callback"):
            call.add_done_callback(done)
        else:
            span.end()
        return call


_pending: set[asyncio.Task[None]] = set()
"""Span-ending tasks kept referenced until they ran (the loop holds tasks weakly)."""


def _fresh_span_context() -> trace.SpanContext:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator  # noqa: PLC0415

    ids = RandomIdGenerator()
    return trace.SpanContext(
        trace_id=ids.generate_trace_id(),
        span_id=ids.generate_span_id(),
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )


class _UnaryUnary(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        span, details = self.start(details)
        return self.finish_when_done(span, await continuation(details, request))


class _UnaryStream(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc,type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        span, details = self.start(details)
        return self.finish_when_done(span, await continuation(details, request))


class _StreamUnary(_ClientTracing, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        span, details = self.start(details)
        return self.finish_when_done(span, await continuation(details, requests))


class _StreamStream(_ClientTracing, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc,type-arg]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        span, details = self.start(details)
        return self.finish_when_done(span, await continuation(details, requests))


def client_interceptors(tracer_provider: trace.TracerProvider | None = None) -> list[Any]:
    """Interceptors for ``grpc.aio.insecure_channel(..., interceptors=...)`` that send
    W3C ``traceparent`` with every call (and record a CLIENT span when tracing is on).

    ``last_trace_id()`` then tells the trace id of the most recent call.
    """
    return [
        _UnaryUnary(tracer_provider),
        _UnaryStream(tracer_provider),
        _StreamUnary(tracer_provider),
        _StreamStream(tracer_provider),
    ]


def last_trace_id() -> str | None:
    """Trace id (32 hex digits) of the last call made through :func:`client_interceptors`."""
    return _ClientTracing.last_trace_id


# --------------------------------------------------------------------------- Redis


def _command_name(args: tuple[Any, ...]) -> str:
    if not args:
        return "UNKNOWN"
    first = args[0]
    name = first.decode() if isinstance(first, bytes) else str(first)
    return name.split(" ", 1)[0].upper()


def _is_blocking(args: tuple[Any, ...]) -> bool:
    return any(
        (isinstance(a, str) and a.upper() == "BLOCK")
        or (isinstance(a, bytes) and a.upper() == b"BLOCK")
        for a in args[1:]
    )


def instrument_redis(
    client: Any,
    metrics: Any = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> Any:
    """Observe every command and pipeline of a redis-py asyncio client; returns ``client``.

    ``metrics`` (a :class:`~activity_events.observability.metrics.ServiceMetrics`, optional)
    gets ``activity_redis_command_duration_seconds{command}`` and
    ``activity_redis_command_errors_total{command,error}``; a pipeline counts
    once as ``PIPELINE``. Blocking reads (``BLOCK``) are not timed, since
    their duration is the wait, not Redis' speed; their errors still count.
    A CLIENT span (``db.system=redis``, ``db.operation``) is made per command
    only when a span is current, so RPCs get Redis children and background
    loops make none. Works for ``redis.asyncio.Redis`` and ``RedisCluster``
    (it wraps this instance's ``execute_command`` and ``pipeline`` only).
    """
    tracer = _tracer(tracer_provider)
    execute_command = client.execute_command
    make_pipeline = client.pipeline

    async def observed(command: str, blocking: bool, run: Callable[[], Awaitable[Any]]) -> Any:
        parent = trace.get_current_span()
        span = None
        if parent.get_span_context().is_valid and parent.is_recording() and not blocking:
            span = tracer.start_span(
                command,
                kind=SpanKind.CLIENT,
                attributes={"db.system": "redis", "db.operation": command},
            )
        started = time.perf_counter()
        try:
            result = await run()
        except BaseException as error:
            if metrics is not None and not isinstance(error, asyncio.CancelledError):
                metrics.redis_command_errors.labels(command, type(error).__name__).inc()
            if span is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            if metrics is not None and not blocking:
                metrics.redis_command_duration.labels(command).observe(
                    time.perf_counter() - started
                )
            if span is not None:
                span.end()
        return result

    async def traced_execute_command(*args: Any, **options: Any) -> Any:
        return await observed(
            _command_name(args), _is_blocking(args), lambda: execute_command(*args, **options)
        )

    def traced_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        execute = pipe.execute

        async def traced_execute(*e_args: Any, **e_kwargs: Any) -> Any:
            return await observed("PIPELINE", False, lambda: execute(*e_args, **e_kwargs))

        pipe.execute = traced_execute
        return pipe

    client.execute_command = traced_execute_command
    client.pipeline = traced_pipeline
    return client
