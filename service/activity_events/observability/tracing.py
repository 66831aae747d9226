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

- one SERVER span per RPC (started by the call pipeline through
  :class:`ServerTracing`), named
  ``package.Service/Method``, with ``rpc.system``, ``rpc.service``,
  ``rpc.method``, ``rpc.grpc.status_code`` and the peer; a W3C
  ``traceparent`` in the request metadata becomes its parent. Health and
  reflection calls are not traced (probes would flood the backend).
- a follow stream (WatchEvents with ``follow``) may run for hours; its span
  ends when the history is sent (the response with ``caught_up``) or after
  :data:`STREAM_SPAN_CAP_SECONDS`, and every live message after that gets a
  short ``.../deliver`` span of its own trace, linked to the RPC span.
- one CLIENT span per Redis command or pipeline
  (:mod:`activity_events.observability.redis_observer`), only as a child of a span
  already current: background loops (the hub's blocking XREADs, health
  probes) make none.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from activity_events import __version__
from activity_events.codec.wire import CAUGHT_UP

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


def _is_caught_up(message: Any) -> bool:
    """Whether a streamed response marks the end of a follow stream's history phase."""
    if isinstance(message, bytes):
        return message == CAUGHT_UP
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


def tracer_of(provider: trace.TracerProvider | None) -> trace.Tracer:
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


class ServerTracing:
    """Starts the SERVER span of a call for the call pipeline.

    ``tracer_provider`` defaults to the global one (set by
    :func:`configure_tracing`). With no SDK provider (tracing off) a call that
    carries no trace context gets no span at all, which costs nothing; one
    that does carry a ``traceparent`` still runs in that context, so its log
    lines carry the caller's trace id.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        stream_span_cap_seconds: float = STREAM_SPAN_CAP_SECONDS,
    ) -> None:
        self.tracer = tracer_of(tracer_provider)
        self.cap = stream_span_cap_seconds
        self._fields = frozenset(propagate.get_global_textmap().fields)
        # Settled once: configure_tracing runs before the server is built.
        self.recording = tracer_provider is not None or isinstance(
            trace.get_tracer_provider(), TracerProvider
        )
        """True when spans are recorded (an SDK provider is configured)."""

    def start(
        self, service: str, method: str, metadata: Iterable[tuple[str, Any]], peer: str
    ) -> RpcSpan | None:
        """The span of a call, or None when it could not record anything."""
        if not self.recording:
            fields = self._fields
            for key, _ in metadata:  # gRPC metadata keys are lower case
                if key in fields:
                    break
            else:
                return None
        carrier = {key.lower(): value for key, value in metadata if isinstance(value, str)}
        return RpcSpan(self, service, method, carrier, peer)


class RpcSpan:
    """The SERVER span of one call and the rules for when it ends.

    A streaming call's span ends when its history is sent (the message
    marking ``caught_up``) or after the cap; later messages get short
    ``.../deliver`` spans of their own traces, linked to the call's span
    (:meth:`delivery`). Codes that are the server's fault mark it an error.
    """

    __slots__ = ("_cap_timer", "_tracing", "context", "method", "open", "service", "span")

    def __init__(
        self, tracing: ServerTracing, service: str, method: str, carrier: dict[str, Any], peer: str
    ) -> None:
        self._tracing = tracing
        self.service = service
        self.method = method
        parent = propagate.extract(carrier)
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            **_peer_attributes(peer),
        }
        self.span = tracing.tracer.start_span(
            f"{service}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        self.context = trace.set_span_in_context(self.span, parent)
        self.open = True
        self._cap_timer: asyncio.TimerHandle | None = None

    def note_request(self, deployments: list[int]) -> None:
        if len(deployments) == 1:
            self.span.set_attribute("activity.deployment_id", deployments[0])

    def streaming(self) -> None:
        """The call streams responses: cap how long its span stays open."""
        loop = asyncio.get_running_loop()
        self._cap_timer = loop.call_later(self._tracing.cap, self.end_early)

    def sending(self, message: Any) -> trace.Span | None:
        """A streamed response goes out: noted on the call's span while it is open
        (:meth:`responded`), else a :meth:`delivery` span the caller ends once sent."""
        if self.open:
            self.responded(message)
            return None
        return self.delivery(message)

    def responded(self, message: Any) -> None:
        """A streamed response goes out; the history marker ends the span early."""
        if self.open and _is_caught_up(message):
            self.end_early()

    def end_early(self) -> None:
        """End the span while the stream goes on."""
        if self.open:
            self.span.set_attribute("activity.stream.continues", True)
            self._close()

    def delivery(self, message: Any) -> trace.Span:
        """A short span for a message sent after the call's span ended."""
        span = self._tracing.tracer.start_span(
            f"{self.service}/{self.method}/deliver",
            context=otel_context.Context(),
            kind=SpanKind.INTERNAL,
            links=[Link(self.span.get_span_context())],
            attributes={"rpc.service": self.service, "rpc.method": self.method},
        )
        if isinstance(message, bytes):
            span.set_attribute("rpc.message.uncompressed_size", len(message))
        else:
            events = getattr(message, "events", None)
            if events is not None:
                span.set_attribute("activity.events", len(events))
        return span

    def end(self, code: grpc.StatusCode, error: BaseException | None) -> None:
        """End the span with the call's status (no-op when it ended early)."""
        if not self.open:
            return
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _ERROR_CODES:
            self.span.set_status(Status(StatusCode.ERROR, code.name))
        expected = grpc.aio.AbortError | asyncio.CancelledError | GeneratorExit
        if error is not None and not isinstance(error, expected):
            self.span.record_exception(error)
        self._close()

    def _close(self) -> None:
        self.open = False
        if self._cap_timer is not None:
            self._cap_timer.cancel()
        self.span.end()
