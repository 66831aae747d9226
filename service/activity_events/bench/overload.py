"""The overload scenario: does the server keep writing, stay healthy and refuse cleanly?

Throughput scenarios ask how fast; this one asks what happens past the
server's limits, where a naive server would run out of memory, starve its
writers or fail health checks until Kubernetes restarts it. Four phases, all
reported in one result object, each bounded in time:

a. **idle**: ``writers`` closed-loop CreateEvent callers into deployment
   ``base`` for ``duration`` seconds: the write rate every later phase is
   compared with (``idle_writes_per_s``).
b. **read storm**: ``count`` events are stored in deployment ``base + 1``
   (CreateEvents batches, not measured), then ``readers`` legacy
   ``ListEvents(Deployment{id: 0})`` calls (every deployment's full history)
   start at once while the writers run again. The readers are driven by
   h2load when it is installed (no Python client to slow them down; see
   `activity_events.bench.h2load`), else by grpc.aio readers that discard
   raw messages. Their outcomes come from the server's own
   ``grpc_server_handled_total`` (before/after difference), since h2load
   does not read gRPC trailers. Meanwhile a health Check every 200 ms and
   the server's RSS every 200 ms.
c. **viewer storm**: ``viewers`` activity-page viewers (raw HTTP/1.1 SSE
   streams of ``base``) and ``followers`` gRPC followers of ``base`` (in
   ``processes`` worker processes, as the follow scenario runs them) connect,
   then the writers run again. Both start after the newest event the writers
   stored, as the page does once it has shown the newest events: the server
   answers a stream asked to catch up on more than 1,000 events with
   ``event: reset`` and ends it (``after=0-0`` on ``base``, which holds the
   earlier phases' writes by then, would only measure resets).
d. **burst**: ``burst`` CreateEvent calls fired at once over the writer
   channels; the server should answer OK or RESOURCE_EXHAUSTED, nothing else.

It needs the server's HTTP side port (``--metrics-url``; ``--spawn`` knows
it) for /metrics and the page, and the server's PID (``--spawn``) for RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import resource
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.bench.channels import CHANNEL_OPTIONS, ChannelPool
from activity_events.bench.followers import FollowerProcesses, WorkerPlan, ready_timeout
from activity_events.bench.h2load import grpc_frame
from activity_events.bench.scenarios import Context, Result, ScenarioError, fill, make_message
from activity_events.bench.sideport import H2loadViewers, SidePort, SidePortError, Viewers
from activity_events.bench.stats import Meter, latency_fields, process_rss_mb
from activity_events.pb import activityevents_pb2 as pb

logger = logging.getLogger(__name__)

T = TypeVar("T")

WRITE_DEADLINE_S = 10.0
"""Per-call deadline of the writers: long enough that only a server in real
trouble misses it, short enough that a stuck call shows as an error."""

SAMPLE_S = 0.2
"""Health checks and RSS samples are taken this often during the storms."""

HEALTH_DEADLINE_S = 2.0
"""Deadline of each health Check, as a Kubernetes gRPC probe might set it."""

READERS_GRACE_S = 5.0
"""How long past their own deadline (``--timeout``) the readers are waited for."""

RSS_SETTLE_S = 10.0
"""How long after the readers ended ``rss_after_mb`` is read: time to free their buffers."""

READER_CONNECTIONS = 4
"""HTTP/2 connections the readers share (each carries readers / 4 streams)."""

FOLLOWER_CONNECTIONS = 4
"""gRPC channels per follower process (a few hundred streams on each)."""

FD_HEADROOM = 1024
"""File descriptors wanted beyond one socket per viewer (channels, pipes, logs)."""

VIEWER_CONNECT_S = 15.0
"""Longest a viewer may take to connect and get its status line."""

SCRAPE_TIMEOUT_S = 5.0
"""Longest one /metrics scrape may take; also how long the server gets to count the
last readers once they ended (it counts a call when its status has been sent)."""

_LIST_METHOD = "/activityevents.ActivityEvents/ListEvents"
_LIST = "ListEvents"


def _rate(events: int, seconds: float) -> float:
    return round(events / seconds, 1) if seconds > 0 else 0.0


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 3) if whole > 0 else None


def _cpu(meter: Meter, prefix: str) -> dict[str, float | None]:
    """A phase's CPU fields (``<prefix>_client_cpu_pct``...): on one machine the
    load generators' share is taken from the server, so every storm says who was busy."""
    return {f"{prefix}_{name}": value for name, value in meter.fields().items()}


# --- writers ----------------------------------------------------------------------


@dataclass
class PhaseWrites:
    """What the writers achieved in one phase: calls answered OK within it, by time."""

    ok: int
    seconds: float
    errors: Counter[str]
    latencies: list[int]

    @property
    def per_s(self) -> float:
        return _rate(self.ok, self.seconds)

    def fields(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_writes_per_s": self.per_s,
            f"{prefix}_write_p99_ms": latency_fields(self.latencies)["p99_ms"],
            f"{prefix}_write_errors": dict(self.errors),
        }


class Writers:
    """``count`` closed-loop CreateEvent callers into one deployment over the pool's channels.

    Event ids keep counting across phases, so no create is ever a duplicate.
    The cursor of the newest stored event is kept for followers to start after.
    """

    def __init__(self, pool: ChannelPool, count: int, deployment: int, message_size: int) -> None:
        self.pool = pool
        self.count = max(1, count)
        self.deployment = deployment
        self.message_size = message_size
        self.last_cursor = ""
        self._next_id = 0

    def event(self) -> pb.EventRequest:
        """The next new event of the deployment."""
        self._next_id += 1
        return pb.EventRequest(
            id=self._next_id,
            message=make_message(self.message_size, self._next_id),
            timestamp=pb.Timestamp(send=time.time_ns()),
            deployment_id=self.deployment,
        )

    async def run(self, seconds: float) -> PhaseWrites:
        """Writes for ``seconds``; calls still in flight then are cancelled, not counted."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        result = PhaseWrites(0, seconds, Counter(), [])

        async def writer(slot: int) -> None:
            create = self.pool.stub(slot).CreateEvent
            while loop.time() < end:
                started = time.perf_counter_ns()
                try:
                    response = await create(self.event(), timeout=WRITE_DEADLINE_S)
                except grpc.aio.AioRpcError as exc:
                    if loop.time() <= end:
                        result.errors[exc.code().name] += 1
                    continue
                if loop.time() <= end:
                    result.ok += 1
                    result.latencies.append(time.perf_counter_ns() - started)
                    self.last_cursor = response.cursor

        tasks = [asyncio.create_task(writer(slot)) for slot in range(self.count)]
        try:
            await asyncio.wait(tasks, timeout=seconds)
        finally:
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:  # cancellation is the normal end; anything else is a bug
            if isinstance(outcome, Exception):
                raise outcome
        return result


# --- samplers ---------------------------------------------------------------------


@dataclass
class Samples:
    """Health Check outcomes and server RSS over one phase."""

    checks: int = 0
    not_serving: int = 0
    rss_mb: list[float] = field(default_factory=list)

    @property
    def rss_max_mb(self) -> float | None:
        return max(self.rss_mb) if self.rss_mb else None


class Sampler:
    """Every `SAMPLE_S`: one health Check (not awaited by the next) and one RSS reading."""

    def __init__(self, target: str, server_pid: int | None) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._pid = server_pid

    async def _check(self, samples: Samples) -> None:
        samples.checks += 1
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_DEADLINE_S
            )
        except grpc.aio.AioRpcError:
            samples.not_serving += 1
            return
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            samples.not_serving += 1

    async def sample(self, samples: Samples, stop: asyncio.Event) -> None:
        """Samples into ``samples`` until ``stop`` is set; waits for the checks in flight."""
        checks: list[asyncio.Task[None]] = []
        try:
            while not stop.is_set():
                checks.append(asyncio.create_task(self._check(samples)))
                if self._pid is not None and (rss := process_rss_mb(self._pid)) is not None:
                    samples.rss_mb.append(rss)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_S)
        finally:
            await asyncio.gather(*checks, return_exceptions=True)

    async def close(self) -> None:
        await self._channel.close(grace=None)


async def _during(sampler: Sampler, samples: Samples, body: Callable[[], Awaitable[T]]) -> T:
    """Runs ``body`` with ``sampler`` sampling into ``samples`` meanwhile."""
    stop = asyncio.Event()
    task = asyncio.create_task(sampler.sample(samples, stop))
    try:
        return await body()
    finally:
        stop.set()
        await task


# --- readers ----------------------------------------------------------------------


class Readers:
    """``count`` concurrent full-history ListEvents(Deployment{id: 0}) calls.

    With h2load: ``h2load -n count -c 4 -m count/4`` on the raw method (one
    POST per reader, a gRPC frame of the empty Deployment, grpc-timeout
    set). Otherwise grpc.aio calls whose messages are not even parsed.
    Either way each reader has ``deadline`` seconds, enforced by the server.
    """

    def __init__(self, target: str, count: int, deadline: float, use_h2load: bool) -> None:
        self.target = target
        self.count = count
        self.deadline = deadline
        self.h2load = shutil.which("h2load") if use_h2load else None
        if use_h2load and self.h2load is None:
            logger.warning("h2load not found: the readers are grpc.aio calls in this process")
        self._process: asyncio.subprocess.Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def client(self) -> str:
        return "h2load" if self.h2load else "grpc"

    async def start(self) -> None:
        if self.count <= 0:
            return
        if self.h2load:
            await self._start_h2load(self.h2load)
            return
        self._channels = [
            grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            for _ in range(READER_CONNECTIONS)
        ]
        self._tasks = [
            asyncio.create_task(self._read(self._channels[k % len(self._channels)]))
            for k in range(self.count)
        ]

    async def _start_h2load(self, executable: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="activity-bench-readers-")
        body = Path(self._tmp.name) / "body"
        body.write_bytes(grpc_frame(pb.Deployment(id=0).SerializeToString()))
        connections = max(1, min(self.count, READER_CONNECTIONS))
        argv = [
            executable,
            "--requests", str(self.count),
            "--clients", str(connections),
            "--max-concurrent-streams", str(-(-self.count // connections)),
            "--threads", "1",
            "--data", str(body),
            "--header", "content-type: application/grpc",
            "--header", "te: trailers",
            "--header", f"grpc-timeout: {max(1, round(self.deadline))}S",
            f"http://{self.target}{_LIST_METHOD}",
        ]  # fmt: skip
        self._process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )

    async def _read(self, channel: grpc.aio.Channel) -> None:
        # No response deserializer: messages arrive as bytes and are dropped unparsed.
        call = channel.unary_stream(
            _LIST_METHOD,
            request_serializer=pb.Deployment.SerializeToString,
            response_deserializer=None,
        )(pb.Deployment(id=0), timeout=self.deadline)
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in call:
                pass

    def running(self) -> bool:
        if self._process is not None:
            return self._process.returncode is None
        return any(not task.done() for task in self._tasks)

    async def wait(self, seconds: float) -> bool:
        """Until every reader ended or ``seconds`` passed; True if they all ended."""
        waiting: list[Awaitable[Any]] = (
            [self._process.wait()] if self._process is not None else list(self._tasks)
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waiting), seconds)
        return not self.running()

    async def check_h2load(self) -> None:
        """Raises if h2load itself failed (it exits 0 whatever the gRPC statuses)."""
        process = self._process
        if process is None or process.returncode in (None, 0):
            return
        output = await process.stdout.read() if process.stdout else b""
        raise ScenarioError(
            f"h2load exited {process.returncode}: {output.decode(errors='replace')[-500:]}"
        )

    async def close(self) -> None:
        """Kills h2load (by its handle) or cancels the readers; removes the temporary body."""
        try:
            if self._process is not None and self._process.returncode is None:
                self._process.kill()
                await self._process.wait()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.gather(*(ch.close(grace=None) for ch in self._channels))
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()


# --- the scenario -----------------------------------------------------------------


def _raise_fd_limit(needed: int) -> None:
    """Viewers need a socket each: lift the soft limit toward the hard one if short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def _read_storm(
    ctx: Context, side: SidePort, writers: Writers, sampler: Sampler, idle: PhaseWrites
) -> Result:
    o = ctx.options
    history = o.base + 1
    filler = dataclasses.replace(ctx, options=dataclasses.replace(o, base=history, deployments=1))
    await fill(filler)
    server_pid = ctx.pids.get("server")
    rss_idle = process_rss_mb(server_pid) if server_pid else None
    before = await side.handled(_LIST, SCRAPE_TIMEOUT_S)
    readers = Readers(o.target, o.readers, o.timeout, use_h2load=o.client == "h2load")
    samples = Samples()
    meter = Meter(pids=dict(ctx.pids))
    ctx.progress.begin("overload: read storm", 0)

    async def storm() -> tuple[PhaseWrites, float]:
        meter.start()
        started = time.perf_counter()
        await readers.start()
        writes = await writers.run(o.duration)
        await readers.wait(o.timeout + READERS_GRACE_S - (time.perf_counter() - started))
        return writes, meter.stop()

    try:
        writes, seconds = await _during(sampler, samples, storm)
        await readers.check_h2load()
        ended = not readers.running()
        after = await side.handled(_LIST, SCRAPE_TIMEOUT_S)
        if ended:
            deadline = time.monotonic() + SCRAPE_TIMEOUT_S
            while sum((after - before).values()) < o.readers and time.monotonic() < deadline:
                await asyncio.sleep(SAMPLE_S)
                after = await side.handled(_LIST, SCRAPE_TIMEOUT_S)
    finally:
        await readers.close()
    outcomes = after - before
    finished = sum(outcomes.values())
    if server_pid:
        await asyncio.sleep(RSS_SETTLE_S)
    other = {code: n for code, n in outcomes.items() if code not in ("OK", "RESOURCE_EXHAUSTED")}
    return {
        "history_events": o.count,
        "readers": o.readers,
        "reader_client": readers.client,
        **writes.fields("storm"),
        "storm_write_ratio": _ratio(writes.per_s, idle.per_s),
        "readers_ok": outcomes["OK"],
        "readers_resource_exhausted": outcomes["RESOURCE_EXHAUSTED"],
        "readers_other": other,
        "readers_running": 0 if ended else max(0, o.readers - finished),
        "readers_seconds": round(seconds, 3),
        **_cpu(meter, "storm"),
        "health_checks": samples.checks,
        "health_not_serving": samples.not_serving,
        "rss_idle_mb": rss_idle,
        "rss_max_mb": samples.rss_max_mb,
        "rss_after_mb": process_rss_mb(server_pid) if server_pid else None,
    }


async def _viewer_storm(
    ctx: Context, side: SidePort, writers: Writers, sampler: Sampler, idle: PhaseWrites
) -> Result:
    o = ctx.options
    _raise_fd_limit(o.viewers + FD_HEADROOM)
    processes = max(1, min(o.processes, o.followers))
    followers = FollowerProcesses(
        [
            WorkerPlan(
                target=o.target,
                connections=FOLLOWER_CONNECTIONS,
                deployments=[o.base] * len(range(index, o.followers, processes)),
                timeout=o.timeout,
                drain_timeout=0.0,
                uvloop=o.uvloop,
                after=writers.last_cursor,
                light=True,
            )
            for index in range(processes)
        ]
        if o.followers > 0
        else []
    )
    after = quote(writers.last_cursor or "0-0")
    path = f"/api/deployments/{o.base}/stream?after={after}"
    h2load = shutil.which("h2load") if o.client == "h2load" else None
    viewers: Viewers | H2loadViewers = (
        H2loadViewers(h2load, side, path, o.viewers) if h2load else Viewers(side, path, o.viewers)
    )
    samples = Samples()
    ctx.progress.begin("overload: viewers", 0)
    try:
        await followers.start(ready_timeout(o.timeout))
        followers_since = time.perf_counter()
        if isinstance(viewers, H2loadViewers):
            await viewers.start()
        else:
            viewers.start(VIEWER_CONNECT_S)
        await viewers.wait_connected(VIEWER_CONNECT_S + 1.0)
        meter = Meter(pids=dict(ctx.pids))
        meter.start()
        writes = await _during(sampler, samples, lambda: writers.run(o.duration))
        meter.stop()
        followers_wall = time.perf_counter() - followers_since
        parts, _, followers_cpu = await followers.finish({}, ready_timeout(o.timeout))
    finally:
        await viewers.close()
        followers.close()
    ended: Counter[str] = Counter()
    for part in parts:
        ended.update(part["ended"])
    return {
        "viewers": o.viewers,
        "viewer_client": "h2load" if isinstance(viewers, H2loadViewers) else "python",
        "viewers_open": viewers.opened,
        "viewers_refused": dict(viewers.refused),
        "viewers_dropped": viewers.dropped,
        "viewers_reset": viewers.resets,
        "viewer_bytes": viewers.bytes_read,
        "followers": o.followers,
        "followers_open": o.followers - sum(ended.values()),
        "followers_caught_up": sum(p["caught_up"] for p in parts),
        "followers_ended": dict(ended),
        **writes.fields("viewer"),
        "viewer_write_ratio": _ratio(writes.per_s, idle.per_s),
        "viewer_health_not_serving": samples.not_serving,
        **_cpu(meter, "viewer"),
        # The follower processes' CPU from caught up to the end of the phase (viewers
        # connecting, then the writes): what they took from the server's cores.
        "viewer_followers_cpu_pct": round(100.0 * followers_cpu / followers_wall, 1),
        "viewer_rss_max_mb": samples.rss_max_mb,
    }


async def _burst(ctx: Context, writers: Writers) -> Result:
    o = ctx.options
    requests = [writers.event() for _ in range(o.burst)]
    codes: Counter[str] = Counter()
    ctx.progress.begin("overload: burst", o.burst)

    async def call(k: int) -> None:
        try:
            await ctx.pool.stub(k).CreateEvent(requests[k], timeout=o.timeout)
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
        else:
            codes["OK"] += 1
        ctx.progress.advance()

    started = time.perf_counter()
    await asyncio.gather(*(call(k) for k in range(o.burst)))
    return {
        "burst": o.burst,
        "burst_codes": dict(codes),
        "burst_seconds": round(time.perf_counter() - started, 3),
    }


async def run_overload(ctx: Context) -> Result:
    """Idle writes, a read storm, a viewer storm and a burst against one server."""
    o = ctx.options
    if not o.metrics_url:
        raise ScenarioError("overload needs the server's HTTP side port: --metrics-url, or --spawn")
    try:
        side = SidePort.from_url(o.metrics_url)
        await side.handled(_LIST, SCRAPE_TIMEOUT_S)  # fails early on a wrong URL
    except SidePortError as exc:
        raise ScenarioError(str(exc)) from exc
    writers = Writers(ctx.pool, o.writers, o.base, o.message_size)
    sampler = Sampler(o.target, ctx.pids.get("server"))
    try:
        ctx.progress.begin("overload: idle", 0)
        meter = ctx.meter()
        meter.start()
        idle = await writers.run(o.duration)
        meter.stop()
        result: Result = {
            "events": idle.ok,
            "seconds": round(idle.seconds, 3),
            "events_per_s": idle.per_s,
            **meter.fields(),
            "writers": o.writers,
            **idle.fields("idle"),
        }
        try:
            result.update(await _read_storm(ctx, side, writers, sampler, idle))
        except SidePortError as exc:
            raise ScenarioError(str(exc)) from exc
        result.update(await _viewer_storm(ctx, side, writers, sampler, idle))
        result.update(await _burst(ctx, writers))
    finally:
        await sampler.close()
    return result
