"""JSON logs: format, trace ids, redaction, uncaught errors, and the real server's stdout."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import grpc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from activity_events.observability import logs
from activity_events.observability.access import AccessLog
from activity_events.observability.access import logger as access_logger
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.redis_process import RedisProcess
from tests.support.server_process import ServerProcess

REQUIRED_KEYS = {"time", "level", "logger", "message"}
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Configure JSON logs into a buffer; restore the root logger afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook)
    stream = io.StringIO()
    logs.configure("DEBUG", secrets=["s3cr3t-pa55"], stream=stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        sys.excepthook = saved[2]
        logs.configure.__globals__["_redactor"] = logs.Redactor()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """The lines written so far (the handler batches lines: flushed first)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_required_keys(captured: io.StringIO) -> None:
    log = logging.getLogger("activity_events.example")
    log.info("hello %s", "world", extra={"deployment_id": 42})
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("it failed")
    logging.getLogger("redis.connection").warning("third party")
    entries = lines(captured)
    assert len(entries) == 3
    for entry in entries:
        assert entry.keys() >= REQUIRED_KEYS
        assert RFC3339.match(entry["time"]), entry["time"]
        datetime.fromisoformat(entry["time"])
    assert entries[0]["message"] == "hello world"
    assert entries[0]["level"] == "INFO"
    assert entries[0]["logger"] == "activity_events.example"
    assert entries[0]["deployment_id"] == 42
    assert "trace_id" not in entries[0]
    assert entries[1]["level"] == "ERROR"
    assert "ValueError: bad\nvalue" in entries[1]["exception"]
    assert entries[2]["logger"] == "redis.connection"


def test_trace_and_span_ids_inside_a_span(captured: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("x").warning("inside")
        context = span.get_span_context()
    logging.getLogger("x").warning("outside")
    inside, outside = lines(captured)
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in outside


ACCESS_CASES = [
    ("OK", 0.0123456, "ipv4:127.0.0.1:5000", 1, 1, [7], None),
    ("RESOURCE_EXHAUSTED", 2.5, "ipv6:[::1]:40000", 1, 0, [1, 2, 3], None),
    ("UNKNOWN", 0.0, 'unix:/s"o\\ck-é', 0, 0, None, RuntimeError("redis://:s3cr3t-pa55@r down")),
    ("CANCELLED", 1e-7, "", 3, 900, [], None),
]


@pytest.mark.parametrize("case", ACCESS_CASES)
def test_access_line_written_directly_equals_the_formatted_record(
    captured: io.StringIO, case: tuple[Any, ...]
) -> None:
    """The access log's fast path (a string built from pieces, straight to the
    JSON handler) writes what formatting a record with the same fields would."""
    access = AccessLog("activityevents.ActivityEvents", "CreateEvent", "unary", quiet=False)
    tracer = TracerProvider().get_tracer("test")
    root = logging.getLogger()
    others = [h for h in root.handlers if not isinstance(h, logs.JsonLinesHandler)]
    for other in others:  # pytest's log capture: as in the server, only the JSON handler
        root.removeHandler(other)
    with contextlib.ExitStack() as restore, tracer.start_as_current_span("call") as span:
        restore.callback(lambda: [root.addHandler(other) for other in others])
        assert logs.direct_handler(access_logger) is not None
        access.write(*case, span=span)
        recorded = io.StringIO()
        handler = logging.StreamHandler(recorded)
        handler.setFormatter(logs.JsonFormatter(logs.Redactor(["s3cr3t-pa55"])))
        access_logger.addHandler(handler)
        access_logger.propagate = False
        try:
            assert logs.direct_handler(access_logger) is None
            access.write(*case, span=span)
        finally:
            access_logger.removeHandler(handler)
            access_logger.propagate = True
    (direct,) = lines(captured)
    formatted = json.loads(recorded.getvalue())
    assert direct.pop("time")[:16] == formatted.pop("time")[:16]
    assert direct == formatted
    assert "s3cr3t-pa55" not in captured.getvalue()
    assert direct["grpc_code"] == case[0] and direct["msg_sent"] == case[4]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("connecting to redis://:hunter2@redis:6379/0", "hunter2"),
        ("connecting to rediss://default:hunter2@redis.example:6380", "hunter2"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc", "eyJhbGciOiJIUzI1NiJ9"),
        ("password=hunter2 user=x", "hunter2"),
        ('{"token": "abc123def"}', "abc123def"),
        ("the configured value s3cr3t-pa55 leaked", "s3cr3t-pa55"),
    ],
)
def test_secrets_never_reach_the_output(captured: io.StringIO, text: str, secret: str) -> None:
    logging.getLogger("x").info("%s", text, extra={"url": text})
    try:
        raise ConnectionError(text)
    except ConnectionError:
        logging.getLogger("x").exception("failed")
    output = captured.getvalue()
    assert secret not in output
    assert "***" in output
    assert secret not in logs.redact(text)


def test_a_secret_in_one_extra_field_among_clean_ones_is_masked(captured: io.StringIO) -> None:
    """Lines are checked for secrets all texts at once; a hit redacts each field."""
    logging.getLogger("x").info(
        "clean message",
        extra={"peer": "ipv4:127.0.0.1:1", "target": "redis://:hunter2@r:6379", "n": 3},
    )
    [line] = lines(captured)
    assert line["target"] == "redis://:***@r:6379"
    assert line["message"] == "clean message" and line["peer"] == "ipv4:127.0.0.1:1"


@given(st.text(alphabet=st.characters(codec="ascii")) | st.text())
@example("PassWord")
@example("x://y")
@example("API-Key")
@example("\u212aey")  # Kelvin sign: case folding outside ASCII
def test_fast_secret_check_never_passes_what_the_pattern_would_flag(text: str) -> None:
    if logs._MAYBE_SECRET.search(text):
        assert logs._maybe_secret(text)


def test_password_of_a_registered_url_is_masked_alone() -> None:
    redactor = logs.Redactor(["redis://:p%40ss-w0rd@redis:6379/0"])
    assert redactor("AUTH failed for p@ss-w0rd") == "AUTH failed for ***"
    assert redactor("AUTH failed for p%40ss-w0rd") == "AUTH failed for ***"
    assert redactor("using redis://redis:6379/0") == "using redis://redis:6379/0"


def test_redaction_keeps_harmless_text() -> None:
    assert logs.redact("redis://redis:6379/0") == "redis://redis:6379/0"
    assert logs.redact("Server has been started on 50051") == "Server has been started on 50051"


def test_uncaught_exception_is_one_json_line() -> None:
    code = textwrap.dedent(
        """
        from activity_events.observability import logs
        logs.configure("INFO")
        import threading
        t = threading.Thread(target=lambda: 1 / 0, name="worker")
        t.start(); t.join()
        raise RuntimeError("redis://:topsecret@host:6379 unreachable")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["level"] for e in entries] == ["CRITICAL", "CRITICAL"]
    assert "ZeroDivisionError" in entries[0]["exception"]
    assert "RuntimeError" in entries[1]["exception"]
    assert "topsecret" not in result.stdout + result.stderr


# --------------------------------------------------------------------------- the real server


def _traffic(port: int) -> None:
    """Start-up is done; send an OK call, an error and a stream, with a client trace id."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ActivityEventsStub(channel)
        metadata = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)
        stub.CreateEvent(
            pb.EventRequest(id=1, deployment_id=7, message="first"), timeout=5, metadata=metadata
        )
        with pytest.raises(grpc.RpcError) as invalid:
            stub.CreateEvent(pb.EventRequest(id=1, deployment_id=-1), timeout=5)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(list(stub.ListEvents(pb.Deployment(id=7), timeout=5))) == 1


@pytest.mark.slow
def test_server_stdout_is_json_and_never_shows_the_password(
    redis_factory: Callable[..., RedisProcess],
    server_process_factory: Callable[..., ServerProcess],
) -> None:
    password = "planted-Pa55word-0451"
    redis = redis_factory()
    # Set after start: the fixture's readiness PING is unauthenticated.
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as conn:
        conn.sendall(f"CONFIG SET requirepass {password}\r\n".encode())
        assert conn.recv(64).startswith(b"+OK")
    url = f"redis://:{password}@127.0.0.1:{redis.port}/0"
    process = server_process_factory(
        {"ACTIVITY_REDIS_URL": url, "ACTIVITY_LOG_LEVEL": "debug"}
    ).start()
    _traffic(process.port)
    time.sleep(0.3)
    process.stop()
    output = process.lines
    assert output, "the server printed nothing"
    entries = []
    for line in output:
        entry = json.loads(line)  # every line, stderr included, is JSON
        assert entry.keys() >= REQUIRED_KEYS, line
        assert RFC3339.match(entry["time"])
        entries.append(entry)
    assert password not in "\n".join(output)
    assert any("Server has been started on" in e["message"] for e in entries)
    assert any(f"127.0.0.1:{redis.port}" in e["message"] for e in entries)  # host stays readable
    access = [e for e in entries if e["logger"] == "activity_events.access"]
    created = [e for e in access if e.get("grpc_method") == "CreateEvent"]
    assert {e["grpc_code"] for e in created} == {"OK", "InvalidArgument"}
    for entry in access:
        assert {
            "grpc_service",
            "grpc_method",
            "grpc_code",
            "duration_seconds",
            "peer",
        } <= entry.keys()
    ok = next(e for e in created if e["grpc_code"] == "OK")
    assert ok["deployment_id"] == 7
    assert ok["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


def test_cancelled_stream_sends_are_not_errors(captured: io.StringIO) -> None:
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise RuntimeError("stream cancelled by the client")
    except RuntimeError:
        grpc_logger.error(
            "ExecuteBatchError raised in core by servicer method [/x.Y/ListEvents]", exc_info=True
        )
    grpc_logger.error("something else went wrong")
    found = lines(captured)
    assert [(e["level"], "exception" in e) for e in found] == [("DEBUG", False), ("ERROR", False)]
