"""``activity-bench``: command line, run loop and output of the benchmark tool."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc

from activity_events.bench import profiler, report
from activity_events.bench.channels import ChannelPool
from activity_events.bench.followers import run_follow
from activity_events.bench.h2load import run_create_h2load
from activity_events.bench.options import SCENARIOS, Options, for_run, resolve
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
from activity_events.bench.spawn import Spawned, SpawnError, spawn_stack
from activity_events.bench.stats import process_rss_mb
from activity_events.bench.subscribe import run_subscribe

logger = logging.getLogger(__name__)

_EXAMPLES = """\
examples:
  activity-bench --spawn create                     # private Redis + server, 64 concurrent creates
  activity-bench --spawn --runs 3 --json all        # each scenario 3 times, JSON + medians
  activity-bench --target 10.0.0.5:50051 replay --count 1000000
  activity-bench --spawn follow --followers 1000 --deployments 10 --rate 500 --duration 10
  activity-bench --echo create                      # the load generator's own ceiling
  activity-bench --spawn create --client h2load      # create driven by h2load (nghttp2-client)
  activity-bench --spawn --py-spy /tmp/prof create  # and profile the server meanwhile
"""

# Knobs copied from the command line into Options when given.
_KNOBS = (
    "count", "concurrency", "connections", "message_size", "deployments", "batch",
    "followers", "rate", "duration", "fill_batch", "fill_concurrency", "base", "timeout",
    "drain_timeout", "client", "processes",
)  # fmt: skip


SCENARIO_RUNNERS: dict[str, Callable[[Context], Awaitable[Result]]] = {
    "create": run_create,
    "ingest": run_ingest,
    "list": run_list,
    "replay": run_replay,
    "follow": run_follow,
    "memory": run_memory,
    "subscribe": run_subscribe,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="activity-bench",
        description="Benchmark an ActivityEvents server: create, ingest, list, replay, "
        "follow and memory scenarios.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenarios", nargs="+", metavar="SCENARIO", choices=[*SCENARIOS, "all"],
        help=f"one or more of {', '.join(SCENARIOS)}, or all",
    )  # fmt: skip
    where = parser.add_argument_group("server")
    where.add_argument("--target", help="host:port of the server (overrides --address/--port)")
    where.add_argument("--address", default="127.0.0.1", help="server address (127.0.0.1)")
    where.add_argument("--port", type=int, default=50051, help="server port (50051)")
    spawn = where.add_mutually_exclusive_group()
    spawn.add_argument(
        "--spawn", action="store_true",
        help="start a private redis-server (AOF everysec) and activity-server for this run",
    )  # fmt: skip
    spawn.add_argument(
        "--echo", action="store_true",
        help="start the in-memory echo server instead: measures the client's ceiling",
    )  # fmt: skip
    where.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for the spawned server (repeatable)",
    )  # fmt: skip
    where.add_argument(
        "--redis-config", action="append", default=[], metavar="NAME=VALUE",
        help="setting for the spawned redis-server over the recommended ones, e.g. "
        "stream-node-max-bytes=4096 for Redis' default (repeatable)",
    )  # fmt: skip
    where.add_argument(
        "--redis-url", help="the server's Redis (memory; Redis connections in follow)"
    )
    knobs = parser.add_argument_group("knobs (defaults depend on the scenario)")
    knobs.add_argument("--count", type=int, help="events (per deployment for list/replay/memory)")
    knobs.add_argument("--concurrency", type=int, help="calls in flight / parallel streams")
    knobs.add_argument("--connections", type=int, help="gRPC channels (TCP connections)")
    knobs.add_argument("--message-size", type=int, help="event message bytes (32)")
    knobs.add_argument("--deployments", type=int, help="deployments written/read")
    knobs.add_argument(
        "--client", choices=("grpc", "h2load"),
        help="create: load generator, grpc.aio (default) or h2load (near-zero client CPU)",
    )  # fmt: skip
    knobs.add_argument("--batch", type=int, help="ingest: events per CreateEvents call")
    knobs.add_argument("--followers", type=int, help="follow: follow streams (1000)")
    knobs.add_argument("--rate", type=float, help="follow: writer events/s (500)")
    knobs.add_argument("--duration", type=float, help="follow: writer seconds (10)")
    knobs.add_argument("--processes", type=int, help="follow: processes the followers run in (2)")
    knobs.add_argument("--fill-batch", type=int, help="batch size when preloading history")
    knobs.add_argument("--fill-concurrency", type=int, help="batches in flight when preloading")
    knobs.add_argument("--base", type=int, help="first deployment id (default: random)")
    knobs.add_argument("--timeout", type=float, help="per-call deadline, seconds (30)")
    knobs.add_argument("--drain-timeout", type=float, help="follow: wait for stragglers (10)")
    out = parser.add_argument_group("output")
    out.add_argument("--runs", type=int, default=1, help="repeat each scenario; adds medians")
    out.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--keep", action="store_true", help="keep the deployments written")
    out.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    out.add_argument(
        "--py-spy", type=Path, metavar="DIR",
        help="with --spawn: record the server with py-spy during each run into DIR",
    )  # fmt: skip
    out.add_argument(
        "--py-spy-native", action="store_true", help="with --py-spy: unwind C frames too"
    )
    out.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    return parser


def _pairs(pairs: list[str], flag: str) -> dict[str, str]:
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects NAME=VALUE, got {pair!r}")
        found[key] = value
    return found


async def _run_once(
    options: Options,
    progress: Progress,
    pids: dict[str, int],
    keep: bool,
    recorder: profiler.Recorder | None = None,
) -> report.Result:
    pool = ChannelPool(options.target, options.connections)
    ctx = Context(options, pool, progress, pids)
    if recorder is not None:
        ctx.on_measure_start, ctx.on_measure_stop = recorder.start, recorder.stop
    progress.start()
    try:
        await pool.ready(options.timeout)
        if options.scenario == "create" and options.client == "h2load":
            result = await run_create_h2load(ctx)
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


def _describe(options: Options, run: int, server: str) -> report.Result:
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
    return fields


async def _bench(args: argparse.Namespace, uvloop_on: bool) -> int:
    scenarios = list(SCENARIOS) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    given = {knob: getattr(args, knob) for knob in _KNOBS}
    out = sys.stdout
    spawned: Spawned | None = None
    results: list[report.Result] = []
    failures = 0
    try:
        if args.spawn or args.echo:
            spawned = await spawn_stack(
                echo=args.echo,
                server_env=_pairs(args.server_env, "--server-env"),
                redis_config=_pairs(args.redis_config, "--redis-config"),
            )
            print(
                "spawned "
                + ", ".join(f"{c.role} pid {c.pid}" for c in spawned.children)
                + f"; server ready in {spawned.startup_s}s (logs in {spawned.workdir})",
                file=sys.stderr,
            )
        target = spawned.target if spawned else (args.target or f"{args.address}:{args.port}")
        redis_url = args.redis_url or (spawned.redis_url if spawned else None)
        pids = spawned.pids() if spawned else {}
        server = "echo" if args.echo else "spawn" if args.spawn else "external"
        progress = Progress(enabled=False if args.no_progress else None)
        if args.py_spy:
            args.py_spy.mkdir(parents=True, exist_ok=True)
        for scenario in scenarios:
            first = resolve(scenario, given, target=target)
            first = Options(**{**first.__dict__, "redis_url": redis_url, "uvloop": uvloop_on})
            runs = []
            for run in range(max(1, args.runs)):
                options = for_run(first, run)
                recorder = None
                if args.py_spy and "server" in pids:
                    recorder = profiler.Recorder(
                        pids["server"],
                        args.py_spy / f"{scenario}-{run + 1}.folded",
                        native=args.py_spy_native,
                    )
                try:
                    figures = await _run_once(options, progress, pids, args.keep, recorder)
                finally:
                    if recorder is not None:
                        recorder.stop()
                        print(profiler.summary(recorder.output), file=sys.stderr)
                result = {**_describe(options, run + 1, server), **figures}
                result.update(cpu_per_event(result))
                result["uvloop"] = uvloop_on
                if spawned is not None:
                    result["server_startup_s"] = spawned.startup_s
                    result["server_rss_mb_at_start"] = spawned.startup_rss_mb
                    if "server" in pids:
                        result["server_rss_mb"] = process_rss_mb(pids["server"])
                failures += "error" in result
                runs.append(result)
                results.append(result)
                if args.json:
                    report.emit_json(result, out)
            if len(runs) > 1:
                median = report.median_result(runs)
                results.append(median)
                if args.json:
                    report.emit_json(median, out)
    except SpawnError as exc:
        print(f"activity-bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if spawned is not None:
            spawned.stop()
    print(report.table(results), file=sys.stderr if args.json else out)
    return 1 if failures else 0


def _runner(use_uvloop: bool) -> tuple[asyncio.Runner, bool]:
    if use_uvloop:
        try:
            import uvloop  # noqa: PLC0415

            return asyncio.Runner(loop_factory=uvloop.new_event_loop), True
        except ImportError:
            pass
    return asyncio.Runner(), False


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``activity-bench`` and ``python -m activity_events.bench``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    runner, uvloop_on = _runner(not args.no_uvloop)
    started = time.perf_counter()
    coroutine: Coroutine[Any, Any, int] = _bench(args, uvloop_on)
    try:
        with runner:
            code = runner.run(coroutine)
    except KeyboardInterrupt:
        print("activity-bench: interrupted", file=sys.stderr)
        return 130
    logger.debug("finished in %.1fs", time.perf_counter() - started)
    return code
