"""gRPC server metrics (go-grpc-prometheus compatible), the access log, service metrics
and the HTTP side port, each on a real grpc.aio server or real sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from activity_events.http.server import MetricsServer
from activity_events.observability.access import deployment_ids
from activity_events.observability.grpc_metrics import GO_CODE_NAMES, GrpcServerMetrics
from activity_events.observability.metrics import ServiceMetrics
from activity_events.pb import activityevents_pb2 as pb
from tests.observability_probe import SERVICE, ProbeServer, probe_services, value, wait_for

GO_CODES = {
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
}  # fmt: skip


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def sample(registry: CollectorRegistry, name: str, method: str, **labels: str) -> float | None:
    grpc_type = {
        "Unary": "unary",
        "ServerStream": "server_stream",
        "ClientStream": "client_stream",
        "Bidi": "bidi_stream",
    }[method]
    return registry.get_sample_value(
        name,
        {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method, **labels},
    )


def test_go_code_names_cover_every_status_code() -> None:
    assert set(GO_CODE_NAMES) == set(grpc.StatusCode)
    assert set(GO_CODE_NAMES.values()) == GO_CODES


def test_every_method_is_initialised_at_zero(registry: CollectorRegistry) -> None:
    services = [pb.DESCRIPTOR.services_by_name["ActivityEvents"], *probe_services()]
    GrpcServerMetrics(registry, services)
    expected_types = {
        ("activityevents.ActivityEvents", "CreateEvent"): "unary",
        ("activityevents.ActivityEvents", "ListEvents"): "server_stream",
        ("activityevents.ActivityEvents", "WatchEvents"): "server_stream",
        ("grpc.health.v1.Health", "Check"): "unary",
        ("grpc.health.v1.Health", "Watch"): "server_stream",
        (SERVICE, "ClientStream"): "client_stream",
        (SERVICE, "Bidi"): "bidi_stream",
    }
    for service in services:
        for method in service.methods:
            labels = {"grpc_service": service.full_name, "grpc_method": method.name}
            kind = expected_types.get((service.full_name, method.name))
            found = [
                s
                for family in registry.collect()
                for s in family.samples
                if s.name == "grpc_server_started_total"
                and s.labels["grpc_service"] == service.full_name
                and s.labels["grpc_method"] == method.name
            ]
            assert len(found) == 1, (service.full_name, method.name)
            if kind is not None:
                assert found[0].labels["grpc_type"] == kind
            labels["grpc_type"] = found[0].labels["grpc_type"]
            for name in (
                "grpc_server_started_total",
                "grpc_server_msg_received_total",
                "grpc_server_msg_sent_total",
                "grpc_server_handling_seconds_count",
            ):
                assert registry.get_sample_value(name, labels) == 0.0, (name, labels)
            for code in GO_CODES:
                assert (
                    registry.get_sample_value(
                        "grpc_server_handled_total", {**labels, "grpc_code": code}
                    )
                    == 0.0
                )


def test_exposition_matches_go_grpc_prometheus(registry: CollectorRegistry) -> None:
    GrpcServerMetrics(registry, probe_services())
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert families["grpc_server_started"].type == "counter"
    assert families["grpc_server_handled"].type == "counter"
    assert families["grpc_server_msg_received"].type == "counter"
    assert families["grpc_server_msg_sent"].type == "counter"
    assert families["grpc_server_handling_seconds"].type == "histogram"
    handled = families["grpc_server_handled"].samples[0]
    assert set(handled.labels) == {"grpc_type", "grpc_service", "grpc_method", "grpc_code"}
    latency = {s.labels.get("le") for s in families["grpc_server_handling_seconds"].samples}
    # Go's prometheus.DefBuckets.
    assert {"0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0",
            "+Inf"} <= latency  # fmt: skip
    for s in families["grpc_server_handling_seconds"].samples:
        assert "grpc_code" not in s.labels
    text = generate_latest(registry).decode()
    assert "_created" not in text


async def test_unary_ok_and_errors(
    registry: CollectorRegistry,
) -> None:
    async with ProbeServer(registry) as probe:
        unary = probe.call("Unary", False, False)
        assert (await unary(value("ok"), timeout=5)).value == "done"
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await unary(value("abort:INVALID_ARGUMENT"), timeout=5)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as exists:
            await unary(value("abort:ALREADY_EXISTS"), timeout=5)
        assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as internal:
            await unary(value("raise"), timeout=5)
        assert internal.value.code() == grpc.StatusCode.INTERNAL
        assert "asked to raise" not in (internal.value.details() or "")

    assert sample(registry, "grpc_server_started_total", "Unary") == 4
    assert sample(registry, "grpc_server_msg_received_total", "Unary") == 4
    assert sample(registry, "grpc_server_msg_sent_total", "Unary") == 1  # only the OK one
    for code, count in {"OK": 1, "InvalidArgument": 1, "AlreadyExists": 1, "Internal": 1}.items():
        assert sample(registry, "grpc_server_handled_total", "Unary", grpc_code=code) == count
    assert sample(registry, "grpc_server_handled_total", "Unary", grpc_code="Unavailable") == 0
    assert sample(registry, "grpc_server_handling_seconds_count", "Unary") == 4


async def test_deadline_exceeded_is_counted(
    registry: CollectorRegistry,
) -> None:
    async with ProbeServer(registry) as probe:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await probe.call("Unary", False, False)(value("hang"), timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await wait_for(
            lambda: (
                sample(registry, "grpc_server_handled_total", "Unary", grpc_code="DeadlineExceeded")
                == 1
            )
        )


async def test_server_stream_counts_messages_and_ends(
    registry: CollectorRegistry,
) -> None:
    async with ProbeServer(registry) as probe:
        stream = probe.call("ServerStream", False, True)
        received = [m.value async for m in stream(value("ok:3"), timeout=5)]
        assert received == ["0", "1", "2"]
        call = stream(value("abort:OUT_OF_RANGE"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as out_of_range:
            async for _ in call:
                pass
        assert out_of_range.value.code() == grpc.StatusCode.OUT_OF_RANGE

    assert sample(registry, "grpc_server_started_total", "ServerStream") == 2
    assert sample(registry, "grpc_server_msg_received_total", "ServerStream") == 2
    assert sample(registry, "grpc_server_msg_sent_total", "ServerStream") == 4  # 3 + "first"
    assert sample(registry, "grpc_server_handled_total", "ServerStream", grpc_code="OK") == 1
    assert (
        sample(registry, "grpc_server_handled_total", "ServerStream", grpc_code="OutOfRange") == 1
    )
    assert sample(registry, "grpc_server_handling_seconds_count", "ServerStream") == 2


async def test_cancelled_stream_is_handled_as_canceled(
    registry: CollectorRegistry,
) -> None:
    async with ProbeServer(registry) as probe:
        call = probe.call("ServerStream", False, True)(value("hang"), timeout=10)
        first = await asyncio.wait_for(call.read(), 5)
        assert first.value == "first"
        assert sample(registry, "grpc_server_handled_total", "ServerStream", grpc_code="OK") == 0
        call.cancel()
        assert await wait_for(
            lambda: (
                sample(registry, "grpc_server_handled_total", "ServerStream", grpc_code="Canceled")
                == 1
            )
        )
    assert sample(registry, "grpc_server_msg_sent_total", "ServerStream") == 1
    assert sample(registry, "grpc_server_handling_seconds_count", "ServerStream") == 1


async def test_client_stream_and_bidi(
    registry: CollectorRegistry,
) -> None:
    async with ProbeServer(registry) as probe:
        client_stream = probe.call("ClientStream", True, False)
        answer = await client_stream(iter([value("ok"), value("ok"), value("ok"), value("ok")]),
                                     timeout=5)  # fmt: skip
        assert answer.value == "4"
        bidi = probe.call("Bidi", True, True)
        echoed = [m.value async for m in bidi(iter([value("ok"), value("ok")]), timeout=5)]
        assert echoed == ["ok", "ok"]
        failing = bidi(iter([value("ok"), value("abort:UNAVAILABLE")]), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            async for _ in failing:
                pass
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE

    assert sample(registry, "grpc_server_msg_received_total", "ClientStream") == 4
    assert sample(registry, "grpc_server_msg_sent_total", "ClientStream") == 1
    assert sample(registry, "grpc_server_handled_total", "ClientStream", grpc_code="OK") == 1
    assert sample(registry, "grpc_server_msg_received_total", "Bidi") == 4
    assert sample(registry, "grpc_server_msg_sent_total", "Bidi") == 3
    assert sample(registry, "grpc_server_handled_total", "Bidi", grpc_code="OK") == 1
    assert sample(registry, "grpc_server_handled_total", "Bidi", grpc_code="Unavailable") == 1


async def test_health_service_is_measured_under_its_full_name(
    registry: CollectorRegistry,
) -> None:
    async with ProbeServer(registry) as probe:
        reply = await probe.health_stub().Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    labels = {"grpc_type": "unary", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
    )


async def test_unknown_method_passes_through(
    registry: CollectorRegistry,
) -> None:
    async with ProbeServer(registry) as probe:
        assert probe.channel is not None
        missing = probe.channel.unary_unary("/probe.Probe/Missing")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await missing(b"", timeout=5)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    names = {s.labels.get("grpc_method") for f in registry.collect() for s in f.samples}
    assert "Missing" not in names


# --------------------------------------------------------------------------- access log


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_records() -> Iterator[list[logging.LogRecord]]:
    handler = _Records()
    access = logging.getLogger("activity_events.access")
    previous = access.level
    access.addHandler(handler)
    access.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        access.removeHandler(handler)
        access.setLevel(previous)


async def test_access_log_one_line_per_rpc(access_records: list[logging.LogRecord]) -> None:
    async with ProbeServer() as probe:
        await probe.call("Unary", False, False)(value("ok"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await probe.call("Unary", False, False)(value("abort:NOT_FOUND"), timeout=5)
        assert [m.value async for m in probe.call("ServerStream", False, True)(value("ok:2"))] == [
            "0",
            "1",
        ]
        await probe.health_stub().Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert await wait_for(lambda: len(access_records) == 4)

    ok, not_found, stream, health_check = access_records
    fields: dict[str, Any] = ok.__dict__
    assert fields["grpc_service"] == SERVICE
    assert fields["grpc_method"] == "Unary"
    assert fields["grpc_code"] == "OK"
    assert fields["duration_seconds"] >= 0
    assert fields["peer"].startswith("ipv4:127.0.0.1:")
    assert ok.levelno == logging.INFO
    assert not_found.__dict__["grpc_code"] == "NotFound"
    assert stream.__dict__["msg_sent"] == 2
    assert health_check.__dict__["grpc_service"] == "grpc.health.v1.Health"
    assert health_check.levelno == logging.DEBUG


def test_deployment_ids_from_requests() -> None:
    assert deployment_ids(pb.EventRequest(id=1, deployment_id=42)) == [42]
    assert deployment_ids(pb.Deployment(id=7)) == [7]
    assert deployment_ids(pb.WatchEventsRequest(deployment_id=3)) == [3]
    assert deployment_ids(pb.DeleteDeploymentRequest(deployment_id=9)) == [9]
    batch = pb.CreateEventsRequest(
        events=[pb.EventRequest(deployment_id=d) for d in (5, 5, 6, 5, 7)]
    )
    assert deployment_ids(batch) == [5, 6, 7]
    assert deployment_ids(pb.ListDeploymentsRequest(page_size=3)) == []
    assert deployment_ids("not a message") == []


# --------------------------------------------------------------------------- service metrics


def test_service_metrics_names_and_helpers(registry: CollectorRegistry) -> None:
    metrics = ServiceMetrics(registry, version="1.2.3")
    assert (
        registry.get_sample_value(
            "activity_build_info",
            {"version": "1.2.3", "python_version": __import__("platform").python_version()},
        )
        == 1
    )
    metrics.record_outcomes(created=3, duplicates=2, conflicts=1, invalid=4)
    assert registry.get_sample_value("activity_events_appended_total") == 3
    assert registry.get_sample_value("activity_events_duplicates_total") == 2
    assert registry.get_sample_value("activity_events_conflicts_total") == 1
    assert registry.get_sample_value("activity_events_invalid_total") == 4
    metrics.batch_size.observe(7)
    assert registry.get_sample_value("activity_batch_size_events_bucket", {"le": "10.0"}) == 1
    metrics.observe_hub_lag("1764370000000-3", now=1764370000.250)
    metrics.observe_hub_lag(b"1764370001000-0", now=1764370000.0)  # clock skew: clamped
    metrics.observe_hub_lag("garbage")  # ignored
    assert registry.get_sample_value("activity_hub_lag_seconds_count") == 2
    assert registry.get_sample_value("activity_hub_lag_seconds_sum") == pytest.approx(0.25)
    assert registry.get_sample_value("activity_hub_lag_seconds_bucket", {"le": "0.001"}) == 1
    metrics.redis_command_duration.labels("XADD").observe(0.0004)
    metrics.redis_command_errors.labels("XADD", "ConnectionError").inc()
    assert (
        registry.get_sample_value(
            "activity_redis_command_errors_total", {"command": "XADD", "error": "ConnectionError"}
        )
        == 1
    )
    text = generate_latest(registry).decode()
    assert "process_cpu_seconds_total" in text or "python_info" in text
    assert "_created" not in text


# --------------------------------------------------------------------------- HTTP side port


async def _http_get(port: int, path: str, verb: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"{verb} {path} HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def test_http_side_port_serves_metrics_and_probes(registry: CollectorRegistry) -> None:
    metrics = ServiceMetrics(registry)
    metrics.events_appended.inc(5)
    ready = {"value": True}

    async def readiness() -> bool:
        return ready["value"]

    server = MetricsServer(registry, host="127.0.0.1", port=0, readiness=readiness)
    await server.start()
    try:
        status, headers, body = await _http_get(server.port, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b"activity_events_appended_total 5.0" in body
        assert int(headers["content-length"]) == len(body)
        assert (await _http_get(server.port, "/healthz"))[0] == 200
        assert (await _http_get(server.port, "/readyz"))[0] == 200
        ready["value"] = False
        assert (await _http_get(server.port, "/readyz"))[0] == 503
        assert (await _http_get(server.port, "/healthz"))[0] == 200
        assert (await _http_get(server.port, "/nope"))[0] == 404
        assert (await _http_get(server.port, "/metrics", verb="POST"))[0] == 405
        status, headers, body = await _http_get(server.port, "/metrics", verb="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    finally:
        await server.stop()


async def test_readiness_that_raises_is_not_ready(registry: CollectorRegistry) -> None:
    def broken() -> bool:
        raise ConnectionError("redis down")

    server = MetricsServer(registry, host="127.0.0.1", port=0, readiness=broken)
    await server.start()
    try:
        assert (await _http_get(server.port, "/readyz"))[0] == 503
    finally:
        await server.stop()


async def test_garbage_request_gets_400(registry: CollectorRegistry) -> None:
    server = MetricsServer(registry, host="127.0.0.1", port=0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"NONSENSE\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 400")
    finally:
        await server.stop()


# --------------------------------------------------------------------------- the real service


async def test_real_service_updates_its_metrics(app_factory: Any, stub_for: Any) -> None:
    """Outcomes, followers, hub lag, overflows, Redis and the side port, on the real server."""
    app = await app_factory(follower_queue=4)
    registry = app.registry
    stub = stub_for(app)
    assert registry.get_sample_value("activity_redis_up") == 1
    assert (await _http_get(app.metrics_port, "/readyz"))[0] == 200

    # A follower on a small receive window, so its queue overflows under a burst.
    slow = stub_for(app, options=[("grpc.http2.bdp_probe", 0)])
    follow = slow.WatchEvents(pb.WatchEventsRequest(deployment_id=1, follow=True), timeout=60)
    while not (await asyncio.wait_for(follow.read(), 5)).caught_up:
        pass
    assert registry.get_sample_value("activity_followers") == 1

    await stub.CreateEvent(pb.EventRequest(id=1, deployment_id=1, message="a"), timeout=5)
    await stub.CreateEvent(pb.EventRequest(id=1, deployment_id=1, message="a"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CreateEvent(pb.EventRequest(id=1, deployment_id=1, message="b"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CreateEvent(pb.EventRequest(id=1, deployment_id=0), timeout=5)
    payload = "x" * 16384
    for start in range(2, 402, 50):
        batch = [
            pb.EventRequest(id=i, deployment_id=1, message=f"{i} {payload}")
            for i in range(start, start + 50)
        ]
        await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=10)
    await stub.CreateEvents(
        pb.CreateEventsRequest(events=[pb.EventRequest(id=-1, deployment_id=1)]), timeout=5
    )
    assert registry.get_sample_value("activity_events_appended_total") == 401
    assert registry.get_sample_value("activity_events_duplicates_total") == 1
    assert registry.get_sample_value("activity_events_conflicts_total") == 1
    assert registry.get_sample_value("activity_events_invalid_total") == 2
    assert registry.get_sample_value("activity_batch_size_events_count") == 9

    with pytest.raises(grpc.aio.AioRpcError) as ended:
        for _ in range(500):
            if await asyncio.wait_for(follow.read(), 10) is grpc.aio.EOF:
                break
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await wait_for(lambda: registry.get_sample_value("activity_followers") == 0)
    assert registry.get_sample_value("activity_follower_overflows_total") == 1
    assert (registry.get_sample_value("activity_hub_lag_seconds_count") or 0) >= 1
    assert (
        registry.get_sample_value(
            "activity_redis_command_duration_seconds_count", {"command": "PIPELINE"}
        )
        or 0
    ) >= 1

    deleted = await stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=1), timeout=5)
    assert registry.get_sample_value("activity_events_deleted_total") == deleted.deleted_events
    assert deleted.deleted_events == 401

    handled = {
        "grpc_type": "unary",
        "grpc_service": "activityevents.ActivityEvents",
        "grpc_method": "CreateEvent",
    }
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**handled, "grpc_code": "OK"}) == 2
    )
    assert (
        registry.get_sample_value(
            "grpc_server_handled_total", {**handled, "grpc_code": "AlreadyExists"}
        )
        == 1
    )
    status, _, body = await _http_get(app.metrics_port, "/metrics")
    assert status == 200 and b"activity_follower_overflows_total 1.0" in body
