"""The six benchmark scenarios; each returns one flat result dict.

Every scenario writes only to its own deployments (``Options.base`` and up,
drawn at random), prepares whatever it reads before its clock starts, and
measures one phase with a `Meter`. Requests are built before the clock starts
too, so what is timed is the RPCs, not protobuf construction in Python.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis

from activity_events.bench.channels import ChannelPool
from activity_events.bench.options import Options
from activity_events.bench.progress import Progress
from activity_events.bench.stats import Meter, latency_fields
from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis import keys

logger = logging.getLogger(__name__)

Result = dict[str, Any]


async def deployment_keys(client: aioredis.Redis, deployment: int) -> dict[str, list[str]]:
    """The keys of one deployment, named by the server's key module, by part:
    the stream, the dedup index (its buckets and their set) and the metadata."""
    members = await client.smembers(keys.buckets(deployment))
    return {
        "events": [keys.events(deployment)],
        "ids": [keys.buckets(deployment)] + [keys.ids(deployment, int(b)) for b in members],
        "meta": [keys.meta(deployment)],
    }


# Preloading history retries transient failures (creates are idempotent).
_FILL_RETRIES = 3
_RETRY_PAUSE_S = 0.5
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_OUTCOME_NAMES: dict[int, str] = {
    pb.OUTCOME_CREATED: "created",
    pb.OUTCOME_DUPLICATE: "duplicate",
    pb.OUTCOME_CONFLICT: "conflict",
    pb.OUTCOME_INVALID: "invalid",
}


class ScenarioError(RuntimeError):
    """A scenario cannot run as asked (e.g. memory without Redis access)."""


@dataclass
class Context:
    """What a scenario runs with: its options, channels, progress bar and known PIDs."""

    options: Options
    pool: ChannelPool
    progress: Progress
    pids: dict[str, int] = field(default_factory=dict)
    on_measure_start: Callable[[], None] | None = None
    on_measure_stop: Callable[[], None] | None = None

    def meter(self) -> Meter:
        """A meter for the measured phase; the profiler hooks ride on it."""
        return Meter(
            pids=dict(self.pids), on_start=self.on_measure_start, on_stop=self.on_measure_stop
        )


def make_message(size: int, index: int) -> str:
    """An ASCII message of exactly ``size`` bytes that differs from event to event."""
    head = f"bench event {index} "
    if len(head) >= size:
        return head[:size]
    return head + "x" * (size - len(head))


def make_event(options: Options, index: int, send_ns: int) -> pb.EventRequest:
    """Event ``index`` of a run: deployments round-robin, ids 1, 2, ... within each."""
    deployments = options.deployments
    return pb.EventRequest(
        id=index // deployments + 1,
        message=make_message(options.message_size, index),
        timestamp=pb.Timestamp(send=send_ns),
        deployment_id=options.base + index % deployments,
    )


def cursor_ms(cursor: str) -> int | None:
    """The millisecond part of a cursor "<deployment>:<ms>-<seq>" (or "<ms>-<seq>")."""
    entry = cursor.rpartition(":")[2]
    ms, _, _ = entry.partition("-")
    return int(ms) if ms.isdigit() else None


def _rate(events: int, seconds: float) -> float:
    return round(events / seconds, 1) if seconds > 0 else 0.0


# --- create -------------------------------------------------------------------


async def run_create(ctx: Context) -> Result:
    """Unary CreateEvent from ``concurrency`` workers over ``connections`` channels."""
    o = ctx.options
    requests = [make_event(o, i, 0) for i in range(o.count)]
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    duplicates = 0
    indexes = itertools.count()
    await warm_up(ctx)
    ctx.progress.begin("create", o.count)

    async def worker(slot: int) -> None:
        nonlocal duplicates
        create = ctx.pool.stub(slot).CreateEvent
        while (index := next(indexes)) < o.count:
            request = requests[index]
            request.timestamp.send = time.time_ns()
            started = time.perf_counter_ns()
            try:
                response = await create(request, timeout=o.timeout)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
            else:
                latencies.append(time.perf_counter_ns() - started)
                duplicates += response.duplicate
            ctx.progress.advance()

    meter = ctx.meter()
    meter.start()
    await asyncio.gather(*(worker(slot) for slot in range(o.concurrency)))
    seconds = meter.stop()
    return {
        "events": len(latencies),
        "seconds": round(seconds, 3),
        "events_per_s": _rate(len(latencies), seconds),
        **latency_fields(latencies),
        "duplicates": duplicates,
        "errors": sum(errors.values()),
        "error_codes": dict(errors),
        **meter.fields(),
    }


async def warm_up(ctx: Context) -> None:
    """One call per channel into a spare deployment: connections, scripts and caches warm."""
    o = ctx.options
    spare = o.base + o.deployments
    calls = [
        ctx.pool.stub(slot).CreateEvent(
            pb.EventRequest(id=slot + 1, message="warm-up", deployment_id=spare),
            timeout=o.timeout,
        )
        for slot in range(len(ctx.pool))
    ]
    await asyncio.gather(*calls)


# --- ingest and the fill used by the read scenarios -----------------------------


@dataclass
class BatchRun:
    """What a run of CreateEvents batches achieved."""

    seconds: float
    latencies: list[int]
    outcomes: Counter[str]
    errors: Counter[str]
    meter: Meter


async def _send_batches(
    ctx: Context,
    total: int,
    batch: int,
    concurrency: int,
    label: str,
    *,
    retries: int = 0,
    measured: bool = True,
) -> BatchRun:
    """Sends events 0..total-1 as CreateEvents batches from ``concurrency`` workers.

    A batch that fails with a transient status is sent again up to ``retries``
    times: safe, since creates are idempotent (a stored event comes back as a
    duplicate). Measured runs use no retries, so every failure shows.
    """
    o = ctx.options
    send_ns = time.time_ns()
    requests = [
        pb.CreateEventsRequest(
            events=[make_event(o, i, send_ns) for i in range(lo, min(lo + batch, total))]
        )
        for lo in range(0, total, batch)
    ]
    latencies: list[int] = []
    outcomes: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    indexes = itertools.count()
    ctx.progress.begin(label, total)

    async def worker(slot: int) -> None:
        create = ctx.pool.stub(slot).CreateEvents
        while (index := next(indexes)) < len(requests):
            request = requests[index]
            for attempt in range(retries + 1):
                started = time.perf_counter_ns()
                try:
                    response = await create(request, timeout=o.timeout)
                except grpc.aio.AioRpcError as exc:
                    if attempt < retries and exc.code() in _TRANSIENT:
                        logger.warning("%s: batch %d failed (%s); again", label, index, exc.code())
                        await asyncio.sleep(_RETRY_PAUSE_S * (attempt + 1))
                        continue
                    errors[exc.code().name] += len(request.events)
                else:
                    latencies.append(time.perf_counter_ns() - started)
                    outcomes.update(r.outcome for r in response.results)
                break
            ctx.progress.advance(len(request.events))

    meter = ctx.meter() if measured else Meter(pids=dict(ctx.pids))
    meter.start()
    await asyncio.gather(*(worker(slot) for slot in range(max(1, concurrency))))
    seconds = meter.stop()
    named: Counter[str] = Counter(
        {_OUTCOME_NAMES.get(code, str(code)): n for code, n in outcomes.items()}
    )
    return BatchRun(seconds, latencies, named, errors, meter)


async def run_ingest(ctx: Context) -> Result:
    """Bulk CreateEvents of ``batch`` events from ``concurrency`` workers."""
    o = ctx.options
    await warm_up(ctx)
    run = await _send_batches(ctx, o.count, o.batch, o.concurrency, "ingest")
    stored = run.outcomes["created"] + run.outcomes["duplicate"]
    return {
        "events": stored,
        "seconds": round(run.seconds, 3),
        "events_per_s": _rate(stored, run.seconds),
        **latency_fields(run.latencies, prefix="batch_"),
        "created": run.outcomes["created"],
        "duplicates": run.outcomes["duplicate"],
        "conflicts": run.outcomes["conflict"],
        "invalid": run.outcomes["invalid"],
        "errors": sum(run.errors.values()),
        "error_codes": dict(run.errors),
        **run.meter.fields(),
    }


async def fill(ctx: Context, *, measured: bool = False) -> BatchRun:
    """Stores ``count`` events in each deployment of the run (not part of read figures)."""
    o = ctx.options
    total = o.count * o.deployments
    run = await _send_batches(
        ctx,
        total,
        o.fill_batch,
        o.fill_concurrency,
        "fill",
        retries=_FILL_RETRIES,
        measured=measured,
    )
    stored = run.outcomes["created"] + run.outcomes["duplicate"]
    if stored != total:
        raise ScenarioError(
            f"fill stored {stored} of {total} events (errors: {dict(run.errors)}, "
            f"outcomes: {dict(run.outcomes)})"
        )
    return run


# --- list and replay ------------------------------------------------------------


async def _read_streams(
    ctx: Context, label: str, read: Callable[[Any, int], Awaitable[tuple[int, int, float]]]
) -> Result:
    """Fills, then runs ``concurrency`` readers (stream k reads deployment k % D)."""
    o = ctx.options
    await fill(ctx)
    ids = o.deployment_ids
    counts: list[int] = []
    messages: list[int] = []
    rates: list[float] = []
    first_ms: list[float] = []
    ctx.progress.begin(label, o.count * o.concurrency)

    async def reader(slot: int) -> None:
        started = time.perf_counter()
        events, msgs, first = await read(ctx.pool.stub(slot), ids[slot % len(ids)])
        elapsed = time.perf_counter() - started
        counts.append(events)
        messages.append(msgs)
        rates.append(events / elapsed if elapsed > 0 else 0.0)
        first_ms.append((first - started) * 1000.0 if first else 0.0)

    meter = ctx.meter()
    meter.start()
    await asyncio.gather(*(reader(slot) for slot in range(o.concurrency)))
    seconds = meter.stop()
    events = sum(counts)
    return {
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": _rate(events, seconds),
        "streams": o.concurrency,
        "per_stream_events_per_s": round(statistics.median(rates), 1),
        "complete": all(n == o.count for n in counts),
        "messages": sum(messages),
        "events_per_message": round(events / max(1, sum(messages)), 1),
        "first_message_ms": round(statistics.median(first_ms), 3),
        **meter.fields(),
    }


async def run_list(ctx: Context) -> Result:
    """Legacy ListEvents replay of ``count`` events, one message per event."""
    o = ctx.options
    advance = ctx.progress.advance

    async def read(stub: Any, deployment: int) -> tuple[int, int, float]:
        events, first = 0, 0.0
        async for _ in stub.ListEvents(pb.Deployment(id=deployment), timeout=o.timeout):
            if not events:
                first = time.perf_counter()
            events += 1
            advance()
        return events, events, first

    return await _read_streams(ctx, "list", read)


async def run_replay(ctx: Context) -> Result:
    """WatchEvents history replay of ``count`` events, many events per message."""
    o = ctx.options
    advance = ctx.progress.advance

    async def read(stub: Any, deployment: int) -> tuple[int, int, float]:
        events, msgs, first = 0, 0, 0.0
        request = pb.WatchEventsRequest(deployment_id=deployment)
        async for response in stub.WatchEvents(request, timeout=o.timeout):
            if not msgs:
                first = time.perf_counter()
            msgs += 1
            n = len(response.events)
            events += n
            advance(n)
        return events, msgs, first

    return await _read_streams(ctx, "replay", read)


# --- memory -----------------------------------------------------------------------


async def run_memory(ctx: Context) -> Result:
    """Redis bytes per stored event: MEMORY USAGE of the deployment's keys / events."""
    o = ctx.options
    if not o.redis_url:
        raise ScenarioError("memory needs Redis access: --redis-url, or --spawn")
    client = aioredis.Redis.from_url(o.redis_url, socket_timeout=30.0)
    try:
        used_before = int((await client.info("memory"))["used_memory"])
        stored = await fill(ctx, measured=True)
        events = o.count * o.deployments
        used_after = int((await client.info("memory"))["used_memory"])
        node_config: dict[Any, Any] = await client.config_get("stream-node-max-*")  # str values
        per_key: dict[str, int] = {"events": 0, "ids": 0, "meta": 0}
        encodings: dict[str, str] = {}
        for deployment in o.deployment_ids:
            for part, names in (await deployment_keys(client, deployment)).items():
                for key in names:
                    usage = await client.memory_usage(key, samples=0)
                    per_key[part] += int(usage or 0)
                encoding = await client.object("encoding", names[-1])
                if encoding is not None:
                    encodings[part] = (
                        encoding.decode() if isinstance(encoding, bytes) else str(encoding)
                    )
    finally:
        await client.aclose()
    total = sum(per_key.values())
    if total == 0:
        raise ScenarioError(
            "MEMORY USAGE found none of the deployment's keys "
            f"({keys.events(o.base)}...): is --redis-url the server's Redis?"
        )
    pb_bytes = _stored_protobuf_bytes(o, events)
    per_event = total / events
    return {
        # The figures of the fill (CreateEvents batches), for the record.
        "events": events,
        "seconds": round(stored.seconds, 3),
        "events_per_s": _rate(events, stored.seconds),
        **stored.meter.fields(),
        "bytes_per_event": round(per_event, 1),
        "protobuf_bytes_per_event": round(pb_bytes, 1),
        "ratio_to_protobuf": round(per_event / pb_bytes, 2),
        "used_memory_per_event": round((used_after - used_before) / events, 1),
        **{f"{suffix}_bytes": n for suffix, n in per_key.items()},
        "encodings": encodings,
        # Stream node size decides how densely entries pack (docs/operations.md, "Redis settings").
        **{name.replace("-", "_"): int(value) for name, value in node_config.items()},
    }


def _stored_protobuf_bytes(options: Options, events: int) -> float:
    """Mean serialized size of the events as stored (EventRequest with receive set).

    Send and receive are current Unix ns, which always take 9 varint bytes, so
    the size does not depend on the exact instants.
    """
    now = time.time_ns()
    total = 0
    for index in range(events):
        event = make_event(options, index, now)
        event.timestamp.receive = now
        total += event.ByteSize()
    return total / events


async def cleanup(ctx: Context) -> None:
    """Deletes the run's deployments (and the warm-up one); errors are only logged."""
    o = ctx.options
    stub = ctx.pool.stub(0)
    for deployment in [*o.deployment_ids, o.base + o.deployments]:
        try:
            await stub.DeleteDeployment(
                pb.DeleteDeploymentRequest(deployment_id=deployment), timeout=o.timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                logger.warning("cleanup of deployment %d: %s", deployment, exc.code().name)
