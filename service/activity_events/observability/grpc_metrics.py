"""go-grpc-prometheus server metrics, recorded by the call pipeline.

Operators run this service next to Go gRPC services and reuse their
dashboards, so :class:`GrpcServerMetrics` exports exactly what
go-grpc-prometheus exports: the same metric names, help texts, label names
(``grpc_type``, ``grpc_service``, ``grpc_method``, ``grpc_code``) and label
values (``grpc_code`` in Go's CamelCase, ``grpc_type`` one of ``unary``,
``client_stream``, ``server_stream``, ``bidi_stream``). Existing Python
interceptors name or label these differently or miss streaming RPCs.

The call pipeline (:mod:`activity_events.grpc.pipeline`) holds one
:class:`MethodMetrics` per method, made once at registration, and updates it
for every call, every message in and out and
every end, including calls it refused (auth, admission) and streams the
client cancelled (``Canceled``, or ``DeadlineExceeded`` when the deadline
passed).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Go's prometheus.DefBuckets, which go-grpc-prometheus uses for handling_seconds."""

_HELP = {
    "started": "Total number of RPCs started on the server.",
    "handled": "Total number of RPCs completed on the server, regardless of success or failure.",
    "received": "Total number of RPC stream messages received on the server.",
    "sent": "Total number of gRPC stream messages sent by the server.",
    "seconds": "Histogram of response latency (seconds) of gRPC that had been application-level "
    "handled by the server.",
}
_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
_BOUNDS: list[str] = [*(floatToGoString(b) for b in BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]


class MethodMetrics:
    """One method's counts, kept as plain integers the call pipeline bumps (a
    prometheus_client child costs a lock and several calls per update; a call
    makes five). Read at scrape time by :class:`GrpcServerMetrics`. The event
    loop is the only writer, so no lock is needed."""

    __slots__ = ("buckets", "handled", "labels", "received", "seconds_sum", "sent", "started")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = 0
        self.received = 0
        self.sent = 0
        self.handled: dict[grpc.StatusCode, int] = dict.fromkeys(GO_CODE_NAMES, 0)
        self.buckets = [0] * (len(BUCKETS) + 1)
        """Observations per bucket (not cumulative); the last is +Inf."""
        self.seconds_sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.seconds_sum += seconds


class GrpcServerMetrics(Collector):
    """go-grpc-prometheus server metrics, collected from :class:`MethodMetrics`.

    ``services`` are the protobuf service descriptors the server serves
    (``pb.DESCRIPTOR.services_by_name["ActivityEvents"]``, health,
    reflection): every method of each gets all its series at zero at once,
    as ``grpc_prometheus.Register(server)`` does in Go, so ``rate()`` and
    alert expressions see a series before the first call or error. Help
    texts and the histogram buckets are Go's; there are no ``_created`` series.
    """

    def __init__(
        self, registry: CollectorRegistry, services: Iterable[ServiceDescriptor] = ()
    ) -> None:
        self._methods: dict[tuple[str, str, str], MethodMetrics] = {}
        for service in services:
            self.initialize(service)
        registry.register(self)

    def initialize(self, service: ServiceDescriptor) -> None:
        """Create every series of every method of ``service`` at zero."""
        for method in service.methods:
            kind = grpc_type(method.client_streaming, method.server_streaming)
            self.method(service.full_name, method.name, kind)

    def method(self, service: str, method: str, kind: str) -> MethodMetrics:
        """The counts of one method (made at zero on first use)."""
        labels = (kind, service, method)
        found = self._methods.get(labels)
        if found is None:
            found = self._methods[labels] = MethodMetrics(labels)
        return found

    def describe(self) -> list[Metric]:
        return list(self._families(()))

    def collect(self) -> list[Metric]:
        return list(self._families(list(self._methods.values())))

    def _families(self, methods: Iterable[MethodMetrics]) -> Iterable[Metric]:
        started = CounterMetricFamily("grpc_server_started", _HELP["started"], labels=_LABELS)
        handled = CounterMetricFamily(
            "grpc_server_handled", _HELP["handled"], labels=[*_LABELS, "grpc_code"]
        )
        received = CounterMetricFamily(
            "grpc_server_msg_received", _HELP["received"], labels=_LABELS
        )
        sent = CounterMetricFamily("grpc_server_msg_sent", _HELP["sent"], labels=_LABELS)
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds", _HELP["seconds"], labels=_LABELS
        )
        for m in methods:
            labels = list(m.labels)
            started.add_metric(labels, m.started)
            received.add_metric(labels, m.received)
            sent.add_metric(labels, m.sent)
            for code, count in m.handled.items():
                handled.add_metric([*labels, GO_CODE_NAMES[code]], count)
            cumulative = list(itertools.accumulate(m.buckets))
            seconds.add_metric(labels, list(zip(_BOUNDS, cumulative, strict=True)), m.seconds_sum)
        return (started, handled, received, sent, seconds)
