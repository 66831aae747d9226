"""The create scenario driven by h2load, for a load generator that costs next to nothing.

A grpc.aio client spends about 250 µs of CPU per unary call on this kind of
machine, as much as a grpc.aio server spends answering it: at 64 concurrent
calls a Python client takes a whole core and caps what it can measure.
h2load (nghttp2's HTTP/2 load generator, Debian package ``nghttp2-client``)
speaks gRPC's framing when given the length-prefixed body and the two gRPC
headers, and spends a few µs per request.

It sends one body for every request, so each request is the same event with
id 0: the server assigns the next id (behaviour of CreateEvent for id 0), and
each call stores a new event. h2load does not read gRPC trailers, so calls
that failed with a gRPC status are found afterwards by counting what the
deployment holds (WatchEvents), and reported as ``errors``.
"""

from __future__ import annotations

import asyncio
import re
import resource
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from activity_events.bench.scenarios import (
    Context,
    Result,
    ScenarioError,
    make_message,
    warm_up,
)
from activity_events.bench.stats import latency_fields
from activity_events.pb import activityevents_pb2 as pb

_METHOD = "/activityevents.ActivityEvents/CreateEvent"
_COUNT_ATTEMPTS = 3
_FINISHED = re.compile(r"finished in ([0-9.]+)(m?s),")


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _stored_events(ctx: Context, deployment: int) -> int:
    """Events the deployment holds, read back (again after a transient failure)."""
    request = pb.WatchEventsRequest(deployment_id=deployment)
    for attempt in range(_COUNT_ATTEMPTS):
        events = 0
        try:
            call = ctx.pool.stub(0).WatchEvents(request, timeout=ctx.options.timeout)
            async for response in call:
                events += len(response.events)
        except grpc.aio.AioRpcError as exc:
            if attempt + 1 >= _COUNT_ATTEMPTS or exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.5 * (attempt + 1))
            continue
        return events
    return 0


@dataclass(frozen=True)
class _Run:
    text: str
    """What h2load printed."""
    seconds: float
    """h2load's own "finished in" (the wall time of the run when it did not say)."""
    fields: dict[str, Any]
    """The meter's fields, h2load's CPU counted in the client's."""


async def _run_measured(ctx: Context, argv: list[str], label: str) -> _Run:
    """Run h2load under the meter (killed past ten times ``--timeout``); raises
    ScenarioError when it fails."""
    ctx.progress.begin(label, 0)
    meter = ctx.meter()
    children_before = _children_cpu()
    meter.start()
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), ctx.options.timeout * 10)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    wall = meter.stop()
    children_cpu = _children_cpu() - children_before
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise ScenarioError(f"h2load exited {process.returncode}: {text[-500:]}")
    match = _FINISHED.search(text)
    seconds = wall
    if match:
        seconds = float(match.group(1)) / (1000.0 if match.group(2) == "ms" else 1.0)
    fields = meter.fields()
    fields["client_cpu_pct"] = round(
        (fields.get("client_cpu_pct") or 0.0) + 100.0 * children_cpu / wall, 1
    )
    return _Run(text, seconds, fields)


async def run_create_h2load(ctx: Context) -> Result:
    """Unary CreateEvent from h2load: ``connections`` sessions, ``concurrency`` streams in all."""
    o = ctx.options
    executable = shutil.which("h2load")
    if executable is None:
        raise ScenarioError("h2load not found (Debian/Ubuntu: apt-get install nghttp2-client)")
    await warm_up(ctx)
    event = pb.EventRequest(id=0, message=make_message(o.message_size, 0), deployment_id=o.base)
    per_session = max(1, -(-o.concurrency // o.connections))
    with tempfile.TemporaryDirectory(prefix="activity-bench-h2load-") as tmp:
        body, log = Path(tmp) / "body", Path(tmp) / "requests.tsv"
        body.write_bytes(grpc_frame(event.SerializeToString()))
        argv = [
            executable,
            "--requests", str(o.count),
            "--clients", str(o.connections),
            "--max-concurrent-streams", str(per_session),
            "--threads", "1",
            "--data", str(body),
            "--header", "content-type: application/grpc",
            "--header", "te: trailers",
            "--log-file", str(log),
            f"http://{o.target}{_METHOD}",
        ]  # fmt: skip
        run = await _run_measured(ctx, argv, "create (h2load)")
        latencies_us: list[int] = []
        statuses = 0
        for line in log.read_text().splitlines():
            columns = line.split("\t")
            if len(columns) >= 3:
                latencies_us.append(int(columns[2]))
                statuses += columns[1] != "200"
    seconds, fields = run.seconds, run.fields
    stored = await _stored_events(ctx, o.base)
    return {
        "events": stored,
        "seconds": round(seconds, 3),
        "events_per_s": round(stored / seconds, 1) if seconds > 0 else 0.0,
        **latency_fields(latencies_us, per_ms=1e3),
        "client": "h2load",
        "requests": len(latencies_us),
        "http_errors": statuses,
        "errors": max(0, o.count - stored),
        **fields,
    }


_DATA_BYTES = re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data")

_STREAMING = {
    "list": "/activityevents.ActivityEvents/ListEvents",
    "replay": "/activityevents.ActivityEvents/WatchEvents",
}


async def _expected_data_bytes(ctx: Context, scenario: str, deployment: int) -> tuple[int, int]:
    """(events, framed response bytes) one reader of ``deployment`` gets, read by
    grpc.aio after the measured run (h2load sees bytes, not messages)."""
    stub = ctx.pool.stub(0)
    events = size = 0
    if scenario == "list":
        async for event in stub.ListEvents(
            pb.Deployment(id=deployment), timeout=ctx.options.timeout
        ):
            events += 1
            size += 5 + event.ByteSize()
    else:
        request = pb.WatchEventsRequest(deployment_id=deployment)
        async for response in stub.WatchEvents(request, timeout=ctx.options.timeout):
            events += len(response.events)
            size += 5 + response.ByteSize()
    return events, size


async def run_read_h2load(ctx: Context, scenario: str) -> Result:
    """History readers (legacy ListEvents or WatchEvents replay) from h2load:
    ``concurrency`` streams over ``connections`` sessions, all reading the one
    deployment (h2load sends one body). The run is complete when the DATA bytes
    are exactly those of that many whole histories (checked against one
    grpc.aio read afterwards)."""
    from activity_events.bench.scenarios import fill  # noqa: PLC0415 - avoids an import cycle

    o = ctx.options
    executable = shutil.which("h2load")
    if executable is None:
        raise ScenarioError("h2load not found (Debian/Ubuntu: apt-get install nghttp2-client)")
    ids = o.deployment_ids
    if len(ids) != 1:
        raise ScenarioError(
            "with --client h2load every reader reads one deployment: --deployments 1"
        )
    await fill(ctx)
    per_session = max(1, -(-o.concurrency // o.connections))
    request = (
        pb.Deployment(id=ids[0])
        if scenario == "list"
        else pb.WatchEventsRequest(deployment_id=ids[0])
    )
    with tempfile.TemporaryDirectory(prefix="activity-bench-h2load-") as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(grpc_frame(request.SerializeToString()))
        argv = [
            executable,
            "--requests", str(o.concurrency),
            "--clients", str(min(o.connections, o.concurrency)),
            "--max-concurrent-streams", str(per_session),
            "--threads", "1",
            "--data", str(body),
            "--header", "content-type: application/grpc",
            "--header", "te: trailers",
            f"http://{o.target}{_STREAMING[scenario]}",
        ]  # fmt: skip
        run = await _run_measured(ctx, argv, f"{scenario} (h2load)")
    traffic = _DATA_BYTES.search(run.text)
    if traffic is None:
        raise ScenarioError(f"h2load printed no traffic line: {run.text[-500:]}")
    seconds, fields = run.seconds, run.fields
    per_reader_events, per_reader_bytes = await _expected_data_bytes(ctx, scenario, ids[0])
    data = int(traffic.group(3))
    complete = data == per_reader_bytes * o.concurrency and per_reader_events == o.count
    events = per_reader_events * o.concurrency if complete else 0
    return {
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1) if seconds > 0 else 0.0,
        "streams": o.concurrency,
        "complete": complete,
        "data_bytes": data,
        "expected_data_bytes": per_reader_bytes * o.concurrency,
        "client": "h2load",
        **fields,
    }
