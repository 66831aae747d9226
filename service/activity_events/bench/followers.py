"""The follow scenario: F followers over D deployments while a writer creates R events/s.

At the target size (1,000 followers, 10 deployments, 500 events/s) the
followers receive 50,000 events a second. A grpc.aio client spends ~15-25 µs
per received message, so one process cannot both receive that and keep the
writer on schedule: the followers therefore run in ``--processes`` worker
processes (spawned, never forked, as gRPC requires), each with its own
channels, and the parent process only writes and samples. With
``--processes 1`` everything runs in the bench's own loop.

Delivery latency is the follower's wall clock at arrival minus the
millisecond of the event's Redis entry id (its cursor): Redis stamps entry ids
from the machine's wall clock when it runs the XADD, and every process here
reads the same clock (``time.time_ns``, CLOCK_REALTIME), so on one machine
this is XADD -> follower, with 1 ms resolution (biased high by under 1 ms).
``receive_*`` uses the server's receive time (ns, taken just before the XADD)
and ``send_*`` the writer's send time (end to end). On several machines these
need synchronised clocks, and are then only as good as the synchronisation.

A drop is an event the writer stored (CreateEvent answered with its cursor)
that a follower of its deployment had not received when the drain timeout
ran out, including every event after a follower was ended early (e.g.
RESOURCE_EXHAUSTED when its queue overflowed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import redis.asyncio as aioredis

from activity_events.bench.channels import ChannelPool
from activity_events.bench.scenarios import Context, Result, ScenarioError, cursor_ms, make_event
from activity_events.bench.stats import latency_fields, process_rss_mb
from activity_events.codec.wire import CAUGHT_UP
from activity_events.pb import activityevents_pb2 as pb

logger = logging.getLogger(__name__)

_POLL_S = 0.05
_SAMPLE_S = 0.5
_SETTLE_TIMEOUT_S = 60.0
_READY_SLACK_S = 30.0  # start-up of a spawned interpreter, on top of settling
_WORKER_EXIT_S = 10.0
_SAMPLER_NAME = "activity-bench"

_WATCH_METHOD = "/activityevents.ActivityEvents/WatchEvents"


@dataclass
class Follower:
    """One follow stream's state: what it received and how it ended."""

    deployment: int
    received: set[str] = field(default_factory=set)
    repeats: int = 0
    caught_up: bool = False
    end: str | None = None
    bytes_read: int = 0


class FollowerGroup:
    """The followers of one process, their latency samples and their outcome.

    ``after`` is the cursor the followers start after ("": the whole history).
    ``light`` followers do not parse what they receive (they only compare each
    message with the caught-up marker, whose encoding is canonical): they
    measure no latency and no drops, and cost their process a fraction of the
    CPU, so that a storm of them loads the server, not the client.
    """

    def __init__(self, deployments: list[int], after: str = "", *, light: bool = False) -> None:
        self.followers = [Follower(d) for d in deployments]
        self.after = after
        self.light = light
        self.settled = 0
        self._all_settled = asyncio.Event()
        self.xadd_ms: array[float] = array("d")
        self.receive_ms: array[float] = array("d")
        self.send_ms: array[float] = array("d")
        self._tasks: list[asyncio.Task[None]] = []
        if not self.followers:
            self._all_settled.set()

    def start(self, pool: ChannelPool) -> None:
        self._tasks = [
            asyncio.create_task(
                self._follow_light(pool.channel(k), follower)
                if self.light
                else self._follow(pool.stub(k), follower)
            )
            for k, follower in enumerate(self.followers)
        ]

    async def _follow_light(self, channel: grpc.aio.Channel, follower: Follower) -> None:
        call = channel.unary_stream(
            _WATCH_METHOD,
            request_serializer=pb.WatchEventsRequest.SerializeToString,
            response_deserializer=None,  # bytes, never parsed
        )(self._request(follower))

        def count(message: bytes) -> None:
            follower.bytes_read += len(message)
            if message == CAUGHT_UP and not follower.caught_up:
                self._caught_up(follower)

        await self._watch(follower, call, count)

    def _request(self, follower: Follower) -> pb.WatchEventsRequest:
        return pb.WatchEventsRequest(
            deployment_id=follower.deployment, follow=True, after=self.after
        )

    async def _watch(self, follower: Follower, call: Any, handle: Callable[[Any], None]) -> None:
        """Hand each message of ``call`` to ``handle`` until the stream ends; note
        how it ended, and settle a follower that never caught up."""
        try:
            async for message in call:
                handle(message)
            follower.end = "OK"
        except grpc.aio.AioRpcError as exc:
            follower.end = exc.code().name
        finally:
            call.cancel()
            if not follower.caught_up:
                self._settle()

    def _caught_up(self, follower: Follower) -> None:
        follower.caught_up = True
        self._settle()

    def _settle(self) -> None:
        self.settled += 1
        if self.settled >= len(self.followers):
            self._all_settled.set()

    async def _follow(self, stub: Any, follower: Follower) -> None:
        received, xadd, receive, send = (
            follower.received,
            self.xadd_ms,
            self.receive_ms,
            self.send_ms,
        )

        def record(response: pb.WatchEventsResponse) -> None:
            if response.caught_up:
                self._caught_up(follower)
                return
            now_ns = time.time_ns()
            now_ms = now_ns / 1e6
            for stored in response.events:
                cursor = stored.cursor
                if cursor in received:
                    follower.repeats += 1
                    continue
                received.add(cursor)
                ms = cursor_ms(cursor)
                if ms is not None:
                    xadd.append(now_ms - ms)
                stamp = stored.event.timestamp
                receive.append((now_ns - stamp.receive) / 1e6)
                send.append((now_ns - stamp.send) / 1e6)

        await self._watch(follower, stub.WatchEvents(self._request(follower)), record)

    async def wait_settled(self, seconds: float) -> None:
        """Until every follower caught up or ended, or ``seconds`` passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_settled.wait(), seconds)

    async def drain(self, expected: dict[int, set[str]], seconds: float) -> None:
        """Until every live follower holds every expected event, or ``seconds`` passed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(  # noqa: ASYNC110 (polls many followers)
            f.end is None and len(f.received) < len(expected.get(f.deployment, ()))
            for f in self.followers
        ):
            await asyncio.sleep(_POLL_S)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def outcome(self, expected: dict[int, set[str]]) -> dict[str, Any]:
        """Counts against ``expected`` (deployment -> cursors the writer stored)."""
        ended = Counter(f.end for f in self.followers if f.end is not None)
        return {
            "followers": len(self.followers),
            "caught_up": sum(f.caught_up for f in self.followers),
            "ended": dict(ended),
            "deliveries": sum(len(f.received) for f in self.followers),
            "expected_deliveries": sum(len(expected.get(f.deployment, ())) for f in self.followers),
            "drops": sum(
                len(expected.get(f.deployment, set()) - f.received) for f in self.followers
            ),
            "repeats": sum(f.repeats for f in self.followers),
            "bytes": sum(f.bytes_read for f in self.followers),
        }


# --- worker processes ------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """What one follower process does: ``deployments`` holds one entry per follower."""

    target: str
    connections: int
    deployments: list[int]
    timeout: float
    drain_timeout: float
    uvloop: bool
    after: str = ""
    light: bool = False


def _worker_main(plan: WorkerPlan, conn: Connection) -> None:
    """Entry point of a follower process (spawned: it shares no gRPC state with the parent)."""
    runner = asyncio.Runner()
    if plan.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: PLC0415

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    try:
        with runner:
            runner.run(_worker(plan, conn))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _recv(conn: Connection, seconds: float) -> Any:
    """The next message from ``conn`` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, conn.poll, seconds):
        raise TimeoutError(f"no message from the other process within {seconds:.0f}s")
    return conn.recv()


async def _worker(plan: WorkerPlan, conn: Connection) -> None:
    pool = ChannelPool(plan.target, plan.connections)
    group = FollowerGroup(plan.deployments, plan.after, light=plan.light)
    try:
        await pool.ready(plan.timeout)
        group.start(pool)
        await group.wait_settled(max(plan.timeout, _SETTLE_TIMEOUT_S))
        conn.send(("ready", group.settled))
        cpu_start = time.process_time()
        kind, payload = await _recv(conn, 3600.0)
        cpu = time.process_time() - cpu_start
        if kind != "expected":
            return
        expected = {int(d): set(cursors) for d, cursors in payload.items()}
        await group.drain(expected, plan.drain_timeout)
    finally:
        await group.stop()
        await pool.close()
    result = group.outcome(expected)
    result.update(
        xadd_ms=group.xadd_ms.tobytes(),
        receive_ms=group.receive_ms.tobytes(),
        send_ms=group.send_ms.tobytes(),
        cpu_s=cpu,
    )
    conn.send(("result", result))


def ready_timeout(call_timeout: float) -> float:
    """How long a follower process may take to start and settle its followers."""
    return max(call_timeout, _SETTLE_TIMEOUT_S) + _READY_SLACK_S


# --- the scenario -------------------------------------------------------------------


async def _count_redis_clients(url: str, samples: list[int], stop: asyncio.Event) -> None:
    """Samples CLIENT LIST every half second; this sampler's own connection is excluded."""
    client = aioredis.Redis.from_url(url, socket_timeout=5.0, client_name=_SAMPLER_NAME)
    try:
        while not stop.is_set():
            clients = await client.client_list()
            samples.append(sum(1 for c in clients if c.get("name") != _SAMPLER_NAME))
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
        "events_per_s": round(len(latencies) / seconds, 1),
        "write_p50_ms": fields["p50_ms"],
        "write_p99_ms": fields["p99_ms"],
        "errors": sum(errors.values()),
        "cpu": meter.fields(),
    }


async def run_follow(ctx: Context) -> Result:
    """F followers over D deployments (in ``processes`` processes), a writer at R events/s."""
    o = ctx.options
    ids = o.deployment_ids
    processes = max(1, min(o.processes, o.followers))
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
    ctx.progress.begin("follow: connect", 0)
    try:
        if processes == 1:
            group = FollowerGroup([ids[k % len(ids)] for k in range(o.followers)])
            try:
                group.start(ctx.pool)
                await group.wait_settled(max(o.timeout, _SETTLE_TIMEOUT_S))
                await writer_pool.ready(o.timeout)
                write = await _write_at_rate(ctx, writer_pool, expected)
                await group.drain(expected, o.drain_timeout)
            finally:
                await group.stop()
            parts = [group.outcome(expected)]
            xadd, receive, send = group.xadd_ms, group.receive_ms, group.send_ms
            followers_cpu = 0.0
        else:
            write, parts, (xadd, receive, send), followers_cpu = await _follow_in_processes(
                ctx, processes, writer_pool, expected
            )
    finally:
        stop.set()
        await asyncio.gather(*samplers, return_exceptions=True)
        await writer_pool.close()

    ended: Counter[str] = Counter()
    for part in parts:
        ended.update(part["ended"])
    cpu = dict(write["cpu"])
    if followers_cpu and write["seconds"] > 0:
        cpu["client_cpu_pct"] = round(
            (cpu.get("client_cpu_pct") or 0.0) + 100.0 * followers_cpu / write["seconds"], 1
        )
    return {
        "events": write["events"],
        "seconds": write["seconds"],
        "events_per_s": write["events_per_s"],
        "processes": processes,
        "followers": o.followers,
        "followers_caught_up": sum(p["caught_up"] for p in parts),
        "followers_ended": dict(ended),
        "followers_exhausted": ended.get("RESOURCE_EXHAUSTED", 0),
        "target_rate": o.rate,
        "deliveries": sum(p["deliveries"] for p in parts),
        "expected_deliveries": sum(p["expected_deliveries"] for p in parts),
        "drops": sum(p["drops"] for p in parts),
        "repeats": sum(p["repeats"] for p in parts),
        **latency_fields(xadd, per_ms=1.0),
        **latency_fields(receive, prefix="receive_", per_ms=1.0),
        **latency_fields(send, prefix="send_", per_ms=1.0),
        "write_p50_ms": write["write_p50_ms"],
        "write_p99_ms": write["write_p99_ms"],
        "write_errors": write["errors"],
        "redis_connections_max": max(redis_samples) if redis_samples else None,
        "server_rss_mb_idle": idle_rss,
        "server_rss_mb_max": max(rss_samples) if rss_samples else None,
        **cpu,
    }


class FollowerProcesses:
    """Followers in spawned worker processes (never forked, as gRPC requires), one
    `WorkerPlan` each; this process only talks to them over pipes.

    `start` returns once every process has its followers caught up (or ended);
    `finish` hands them the cursors the writer stored and collects what they
    received; `close` (in ``finally``) ends the processes by their handles.
    """

    def __init__(self, plans: list[WorkerPlan]) -> None:
        self.plans = plans
        self._workers: list[tuple[Any, Connection]] = []

    async def start(self, seconds: float) -> None:
        """Starts the processes and waits up to ``seconds`` for each to be ready."""
        mp = multiprocessing.get_context("spawn")
        for plan in self.plans:
            ours, theirs = mp.Pipe()
            process = mp.Process(target=_worker_main, args=(plan, theirs), daemon=True)
            process.start()
            theirs.close()
            self._workers.append((process, ours))
        for _, conn in self._workers:
            kind, payload = await _recv(conn, seconds)
            if kind != "ready":
                raise ScenarioError(f"follower process failed: {payload}")

    async def finish(
        self, expected: dict[int, set[str]], seconds: float
    ) -> tuple[list[dict[str, Any]], tuple[array[float], ...], float]:
        """Each process's outcome against ``expected`` (waiting up to ``seconds``
        for each), the latency samples (XADD, receive, send) of all, and their
        CPU seconds since `start`."""
        plain = {d: sorted(cursors) for d, cursors in expected.items()}
        for _, conn in self._workers:
            conn.send(("expected", plain))
        parts = []
        samples: tuple[array[float], ...] = (array("d"), array("d"), array("d"))
        cpu = 0.0
        for _, conn in self._workers:
            kind, payload = await _recv(conn, seconds)
            if kind != "result":
                raise ScenarioError(f"follower process failed: {payload}")
            for target, name in zip(samples, ("xadd_ms", "receive_ms", "send_ms"), strict=True):
                target.frombytes(payload.pop(name))
            cpu += payload.pop("cpu_s")
            parts.append(payload)
        return parts, samples, cpu

    def close(self) -> None:
        for process, conn in self._workers:
            conn.close()
            process.join(_WORKER_EXIT_S)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)


async def _follow_in_processes(
    ctx: Context, processes: int, writer_pool: ChannelPool, expected: dict[int, set[str]]
) -> tuple[dict[str, Any], list[dict[str, Any]], tuple[array[float], ...], float]:
    """Followers in worker processes; the writer here. Returns write, parts, samples, CPU s."""
    o = ctx.options
    ids = o.deployment_ids
    workers = FollowerProcesses(
        [
            WorkerPlan(
                target=o.target,
                connections=max(1, o.connections // processes),
                deployments=[ids[k % len(ids)] for k in range(index, o.followers, processes)],
                timeout=o.timeout,
                drain_timeout=o.drain_timeout,
                uvloop=o.uvloop,
            )
            for index in range(processes)
        ]
    )
    try:
        await workers.start(ready_timeout(o.timeout))
        await writer_pool.ready(o.timeout)
        write = await _write_at_rate(ctx, writer_pool, expected)
        parts, samples, cpu = await workers.finish(expected, o.drain_timeout + 60.0)
        return write, parts, samples, cpu
    finally:
        workers.close()
