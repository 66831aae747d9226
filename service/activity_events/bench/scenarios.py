"""The six benchmark scenarios; each returns one flat result dict.

Every scenario writes only to its own deployments (``Options.base`` and up,
drawn at random), prepares whatever it reads before its clock starts, and
measures one phase with a `Meter`. Requests are built before the clock starts
too, so what is timed is the RPCs, not protobuf construction in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import statistics
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis

from activity_events import keys
from activity_events.bench.channels import ChannelPool
from activity_events.bench.options import Options
from activity_events.bench.progress import Progress
from activity_events.bench.stats import Meter, latency_fields, process_rss_mb
from activity_events.pb import activityevents_pb2 as pb

logger = logging.getLogger(__name__)

Result = dict[str, Any]

# The keys of one deployment, named by the server's key module: the stream,
# the dedup index and the metadata hash.
KEY_BUILDERS: dict[str, Callable[[int], str]] = {
    "events": keys.events,
    "ids": keys.ids,
    "meta": keys.meta,
}

_POLL_S = 0.05
_SAMPLE_S = 0.5
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

    def meter(self) -> Meter:
        return Meter(pids=dict(self.pids))


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
    ctx: Context, total: int, batch: int, concurrency: int, label: str
) -> BatchRun:
    """Sends events 0..total-1 as CreateEvents batches from ``concurrency`` workers."""
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
            started = time.perf_counter_ns()
            try:
                response = await create(request, timeout=o.timeout)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += len(request.events)
            else:
                latencies.append(time.perf_counter_ns() - started)
                outcomes.update(r.outcome for r in response.results)
            ctx.progress.advance(len(request.events))

    meter = ctx.meter()
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


async def fill(ctx: Context) -> BatchRun:
    """Stores ``count`` events in each deployment of the run (not part of read figures)."""
    o = ctx.options
    total = o.count * o.deployments
    run = await _send_batches(ctx, total, o.fill_batch, o.fill_concurrency, "fill")
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


# --- follow -----------------------------------------------------------------------


@dataclass
class _Follower:
    deployment: int
    received: set[str] = field(default_factory=set)
    repeats: int = 0
    caught_up: bool = False
    end: str | None = None


@dataclass
class _FollowState:
    followers: list[_Follower]
    settled: int = 0
    all_settled: asyncio.Event = field(default_factory=asyncio.Event)
    xadd_ms: array[float] = field(default_factory=lambda: array("d"))
    receive_ms: array[float] = field(default_factory=lambda: array("d"))
    send_ms: array[float] = field(default_factory=lambda: array("d"))

    def settle(self) -> None:
        self.settled += 1
        if self.settled >= len(self.followers):
            self.all_settled.set()


async def _follow_one(stub: Any, follower: _Follower, state: _FollowState) -> None:
    """One follow stream: records each live event's delivery latency and cursor."""
    call = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=follower.deployment, follow=True))
    try:
        async for response in call:
            if response.caught_up:
                follower.caught_up = True
                state.settle()
                continue
            now_ns = time.time_ns()
            now_ms = now_ns / 1e6
            for stored in response.events:
                cursor = stored.cursor
                if cursor in follower.received:
                    follower.repeats += 1
                    continue
                follower.received.add(cursor)
                ms = cursor_ms(cursor)
                if ms is not None:
                    state.xadd_ms.append(now_ms - ms)
                stamp = stored.event.timestamp
                state.receive_ms.append((now_ns - stamp.receive) / 1e6)
                state.send_ms.append((now_ns - stamp.send) / 1e6)
        follower.end = "OK"
    except grpc.aio.AioRpcError as exc:
        follower.end = exc.code().name
    finally:
        call.cancel()
        if not follower.caught_up:
            state.settle()


async def _count_redis_clients(url: str, samples: list[int], stop: asyncio.Event) -> None:
    """Samples CLIENT LIST every half second; this sampler's own connection is excluded."""
    client = aioredis.Redis.from_url(url, socket_timeout=5.0, client_name="activity-bench")
    try:
        while not stop.is_set():
            clients = await client.client_list()
            samples.append(sum(1 for c in clients if c.get("name") != "activity-bench"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _SAMPLE_S)
    finally:
        await client.aclose()


async def _sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss = process_rss_mb(pid)
        if rss is not None:
            samples.append(rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _SAMPLE_S)


async def run_follow(ctx: Context) -> Result:
    """F followers over D deployments while a writer creates ``rate`` events/s.

    Delivery latency is the follower's wall clock at arrival minus the
    millisecond of the event's Redis entry id (its cursor): Redis stamps entry
    ids from the same machine's wall clock when it runs the XADD, so on one
    machine this is XADD -> follower, with 1 ms resolution (biased high by
    under 1 ms). ``receive_*`` uses the server's receive time (ns, taken before
    the XADD) and ``send_*`` the writer's send time (end to end).
    """
    o = ctx.options
    ids = o.deployment_ids
    state = _FollowState([_Follower(ids[k % len(ids)]) for k in range(o.followers)])
    expected: dict[int, set[str]] = {d: set() for d in ids}
    stop = asyncio.Event()
    redis_samples: list[int] = []
    rss_samples: list[float] = []
    samplers: list[asyncio.Task[None]] = []
    server_pid = ctx.pids.get("server")
    idle_rss = process_rss_mb(server_pid) if server_pid else None
    if o.redis_url:
        samplers.append(asyncio.create_task(_count_redis_clients(o.redis_url, redis_samples, stop)))
    if server_pid:
        samplers.append(asyncio.create_task(_sample_rss(server_pid, rss_samples, stop)))
    writer_pool = ChannelPool(o.target, 1)
    tasks = [
        asyncio.create_task(_follow_one(ctx.pool.stub(k), f, state))
        for k, f in enumerate(state.followers)
    ]
    try:
        ctx.progress.begin("follow: connect", o.followers)
        deadline = time.monotonic() + max(o.timeout, 30.0)
        while not state.all_settled.is_set() and time.monotonic() < deadline:
            ctx.progress.done = state.settled
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.all_settled.wait(), _POLL_S)
        await writer_pool.ready(o.timeout)
        write = await _write_at_rate(ctx, writer_pool, expected)
        # Drain: wait until every live follower has every event of its deployment.
        drain_deadline = time.monotonic() + o.drain_timeout
        while time.monotonic() < drain_deadline and any(  # noqa: ASYNC110 (polls many followers)
            f.end is None and len(f.received) < len(expected[f.deployment]) for f in state.followers
        ):
            await asyncio.sleep(_POLL_S)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *samplers, return_exceptions=True)
        await writer_pool.close()

    expected_deliveries = sum(len(expected[f.deployment]) for f in state.followers)
    drops = sum(len(expected[f.deployment] - f.received) for f in state.followers)
    ended = Counter(f.end for f in state.followers if f.end is not None)
    deliveries = sum(len(f.received) for f in state.followers)
    return {
        "events": write["events"],
        "seconds": write["seconds"],
        "events_per_s": write["events_per_s"],
        "followers": o.followers,
        "followers_caught_up": sum(f.caught_up for f in state.followers),
        "followers_ended": dict(ended),
        "followers_exhausted": ended.get("RESOURCE_EXHAUSTED", 0),
        "target_rate": o.rate,
        "deliveries": deliveries,
        "expected_deliveries": expected_deliveries,
        "drops": drops,
        "repeats": sum(f.repeats for f in state.followers),
        **latency_fields(state.xadd_ms, per_ms=1.0),
        **latency_fields(state.receive_ms, prefix="receive_", per_ms=1.0),
        **latency_fields(state.send_ms, prefix="send_", per_ms=1.0),
        "write_p50_ms": write["write_p50_ms"],
        "write_p99_ms": write["write_p99_ms"],
        "write_errors": write["errors"],
        "redis_connections_max": max(redis_samples) if redis_samples else None,
        "server_rss_mb_idle": idle_rss,
        "server_rss_mb_max": max(rss_samples) if rss_samples else None,
        **write["cpu"],
    }


async def _write_at_rate(
    ctx: Context, pool: ChannelPool, expected: dict[int, set[str]]
) -> dict[str, Any]:
    """Creates rate x duration events on schedule, at most ``concurrency`` in flight."""
    o = ctx.options
    total = max(1, int(o.rate * o.duration))
    requests = [make_event(o, i, 0) for i in range(total)]
    create = pool.stub(0).CreateEvent
    gate = asyncio.Semaphore(max(1, o.concurrency))
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    loop = asyncio.get_running_loop()

    async def write(index: int) -> None:
        request = requests[index]
        async with gate:
            request.timestamp.send = time.time_ns()
            started = time.perf_counter_ns()
            try:
                response = await create(request, timeout=o.timeout)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                return
            latencies.append(time.perf_counter_ns() - started)
            expected[request.deployment_id].add(response.cursor)
            ctx.progress.advance()

    ctx.progress.begin("follow: write", total)
    meter = ctx.meter()
    meter.start()
    start = loop.time()
    writes = []
    for index in range(total):
        delay = start + index / o.rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        writes.append(asyncio.create_task(write(index)))
    await asyncio.gather(*writes)
    seconds = meter.stop()
    fields = latency_fields(latencies)
    return {
        "events": len(latencies),
        "seconds": round(seconds, 3),
        "events_per_s": _rate(len(latencies), seconds),
        "write_p50_ms": fields["p50_ms"],
        "write_p99_ms": fields["p99_ms"],
        "errors": sum(errors.values()),
        "cpu": meter.fields(),
    }


# --- memory -----------------------------------------------------------------------


async def run_memory(ctx: Context) -> Result:
    """Redis bytes per stored event: MEMORY USAGE of the deployment's keys / events."""
    o = ctx.options
    if not o.redis_url:
        raise ScenarioError("memory needs Redis access: --redis-url, or --spawn")
    client = aioredis.Redis.from_url(o.redis_url, socket_timeout=30.0)
    try:
        used_before = int((await client.info("memory"))["used_memory"])
        stored = await fill(ctx)
        events = o.count * o.deployments
        used_after = int((await client.info("memory"))["used_memory"])
        per_key: dict[str, int] = dict.fromkeys(KEY_BUILDERS, 0)
        encodings: dict[str, str] = {}
        for deployment in o.deployment_ids:
            for suffix, key_of in KEY_BUILDERS.items():
                key = key_of(deployment)
                usage = await client.memory_usage(key, samples=0)
                per_key[suffix] += int(usage or 0)
                encoding = await client.object("encoding", key)
                if encoding is not None:
                    encodings[suffix] = (
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


SCENARIO_RUNNERS: dict[str, Callable[[Context], Awaitable[Result]]] = {
    "create": run_create,
    "ingest": run_ingest,
    "list": run_list,
    "replay": run_replay,
    "follow": run_follow,
    "memory": run_memory,
}


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
