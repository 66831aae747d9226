"""One scenario run against one server, as a complete result record.

Shared by the plain run loop (`activity_events.bench.cli`) and the comparison
of servers (`activity_events.bench.compare`), so that a figure means the same
in both: same channels, same clean-up, same CPU accounting, same fields.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from activity_events.bench import profiler, report
from activity_events.bench.channels import ChannelPool
from activity_events.bench.followers import run_follow
from activity_events.bench.h2load import run_create_h2load, run_read_h2load
from activity_events.bench.options import Options
from activity_events.bench.overload import run_overload
from activity_events.bench.progress import Progress
from activity_events.bench.scenarios import (
    Context,
    Result,
    ScenarioError,
    cleanup,
    run_create,
    run_ingest,
    run_list,
    run_memory,
    run_replay,
)
from activity_events.bench.spawn import Spawned
from activity_events.bench.stats import process_rss_mb
from activity_events.bench.subscribe import run_subscribe

SCENARIO_RUNNERS: dict[str, Callable[[Context], Awaitable[Result]]] = {
    "create": run_create,
    "ingest": run_ingest,
    "list": run_list,
    "replay": run_replay,
    "follow": run_follow,
    "memory": run_memory,
    "subscribe": run_subscribe,
    "overload": run_overload,
}


async def run_once(
    options: Options,
    progress: Progress,
    pids: dict[str, int],
    keep: bool,
    recorder: profiler.Recorder | None = None,
) -> report.Result:
    """The scenario's own figures, or ``{"error": ...}`` when it failed."""
    pool = ChannelPool(options.target, options.connections)
    ctx = Context(options, pool, progress, pids)
    if recorder is not None:
        ctx.on_measure_start, ctx.on_measure_stop = recorder.start, recorder.stop
    progress.start()
    try:
        await pool.ready(options.timeout)
        if options.scenario == "create" and options.client == "h2load":
            result = await run_create_h2load(ctx)
        elif options.scenario in ("list", "replay") and options.client == "h2load":
            result = await run_read_h2load(ctx, options.scenario)
        else:
            result = await SCENARIO_RUNNERS[options.scenario](ctx)
    except (ScenarioError, grpc.aio.AioRpcError, TimeoutError) as exc:
        message = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        result = {"error": f"{code}: {message or 'timed out'}"}
    finally:
        await progress.stop()
        try:
            if not keep:
                with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                    await cleanup(ctx)
        finally:
            await pool.close()
    return result


def cpu_per_event(result: report.Result) -> dict[str, float]:
    """CPU µs per event of each process measured: ``<role>_cpu_us_per_event``.

    Throughput on a shared machine depends on what else runs; CPU spent per
    event hardly does, and 1e6 / µs is the events/s one core could carry.
    """
    events, seconds = result.get("events"), result.get("seconds")
    if not isinstance(events, int) or events <= 0 or not isinstance(seconds, int | float):
        return {}
    fields = {}
    for role in ("client", "server", "redis"):
        pct = result.get(f"{role}_cpu_pct")
        if isinstance(pct, int | float):
            fields[f"{role}_cpu_us_per_event"] = round(pct / 100.0 * seconds / events * 1e6, 2)
    return fields


def describe(options: Options, run: int, server: str) -> report.Result:
    """The knobs that produced a result, in front of its figures."""
    fields: report.Result = {
        "scenario": options.scenario,
        "run": run,
        "target": options.target,
        "server": server,
        "count": options.count,
        "concurrency": options.concurrency,
        "connections": options.connections,
        "message_size": options.message_size,
        "deployments": options.deployments,
        "base": options.base,
    }
    if options.scenario == "create":
        fields["client"] = options.client
    if options.scenario == "ingest":
        fields["batch"] = options.batch
    if options.scenario == "follow":
        fields.update(rate=options.rate, duration=options.duration, processes=options.processes)
    if options.scenario == "overload":
        fields.update(duration=options.duration, processes=options.processes)
    return fields


async def measure(
    options: Options,
    run: int,
    server: str,
    spawned: Spawned | None,
    progress: Progress,
    *,
    keep: bool,
    profile: Path | None = None,
    native: bool = False,
) -> report.Result:
    """Run ``run`` (1-based) of a scenario against ``server`` ("spawn", "echo",
    "naive" or "external"; ``spawned`` holds its processes when this tool
    started them): the knobs, the figures, CPU per event and the server's
    start-up and RSS. With ``profile`` (a folded-stacks path) and a known
    server PID, py-spy records the server during the measured phase."""
    pids = spawned.pids() if spawned is not None else {}
    recorder = None
    if profile is not None and "server" in pids:
        recorder = profiler.Recorder(pids["server"], profile, native=native)
    try:
        figures = await run_once(options, progress, pids, keep, recorder)
    finally:
        if recorder is not None:
            recorder.stop()
            print(profiler.summary(recorder.output), file=sys.stderr)
    result = {**describe(options, run, server), **figures}
    result.update(cpu_per_event(result))
    result["uvloop"] = options.uvloop
    if spawned is not None:
        result["server_startup_s"] = spawned.startup_s
        result["server_rss_mb_at_start"] = spawned.startup_rss_mb
        if "server" in pids:
            result["server_rss_mb"] = process_rss_mb(pids["server"])
    return result
