"""``activity-bench``: command line, run loop and output of the benchmark tool."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from activity_events.bench import compare, report
from activity_events.bench.options import SCENARIOS, for_run, resolve
from activity_events.bench.progress import Progress
from activity_events.bench.runner import measure
from activity_events.bench.spawn import ServerKind, Spawned, SpawnError, spawn_stack

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
  activity-bench --naive create                     # the naive server (redis-py, one XADD a call)
  activity-bench --compare --runs 3 create --client h2load
                        # echo, naive and real server in turn per run; medians and ratios
  activity-bench --spawn overload                   # idle writes, read storm, viewers, burst
  activity-bench --target 10.0.0.5:50051 --metrics-url http://10.0.0.5:9464 overload \\
      --writers 20 --readers 50 --viewers 200 --followers 200 --burst 1000

overload: W writers (--writers) write for --duration s idle; then --count events are
stored and --readers full-history ListEvents readers (h2load if installed) start while
the writers run again; then --viewers page SSE viewers and --followers followers (in
--processes processes) while they write again; then --burst creates at once. Needs the
server's HTTP side port (--metrics-url; --spawn knows it).
"""

# Knobs copied from the command line into Options when given.
_KNOBS = (
    "count", "concurrency", "connections", "message_size", "deployments", "batch",
    "followers", "rate", "duration", "fill_batch", "fill_concurrency", "base", "timeout",
    "drain_timeout", "client", "processes", "writers", "readers", "viewers", "burst",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="activity-bench",
        description="Benchmark an ActivityEvents server: create, ingest, list, replay, "
        "follow, memory, subscribe and overload scenarios.",
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
    spawn.add_argument(
        "--naive", action="store_true",
        help="start a private redis-server and the naive server (plain grpc.aio + redis-py, "
        "one XADD a create) instead",
    )  # fmt: skip
    spawn.add_argument(
        "--compare", action="store_true",
        help=f"per run start the echo, the naive and the real server in turn and measure "
        f"each; report medians and the real server's ratios ({', '.join(compare.SCENARIOS)})",
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
    where.add_argument(
        "--metrics-url", metavar="URL",
        help="the server's HTTP side port, e.g. http://127.0.0.1:9464 (overload: /metrics "
        "and the activity page); --spawn knows it",
    )  # fmt: skip
    knobs = parser.add_argument_group("knobs (defaults depend on the scenario)")
    knobs.add_argument("--count", type=int, help="events (per deployment for list/replay/memory)")
    knobs.add_argument("--concurrency", type=int, help="calls in flight / parallel streams")
    knobs.add_argument("--connections", type=int, help="gRPC channels (TCP connections)")
    knobs.add_argument("--message-size", type=int, help="event message bytes (32)")
    knobs.add_argument("--deployments", type=int, help="deployments written/read")
    knobs.add_argument(
        "--client", choices=("grpc", "h2load"),
        help="create, list, replay: load generator, grpc.aio (default) or h2load (near-zero "
        "client CPU); overload: what drives the readers (h2load when installed, else grpc)",
    )  # fmt: skip
    knobs.add_argument("--batch", type=int, help="ingest: events per CreateEvents call")
    knobs.add_argument("--followers", type=int, help="follow, overload: follow streams (1000)")
    knobs.add_argument("--rate", type=float, help="follow: writer events/s (500)")
    knobs.add_argument(
        "--duration", type=float, help="follow: writer seconds (10); overload: per phase (5)"
    )
    knobs.add_argument(
        "--processes", type=int, help="follow, overload: processes the followers run in (2)"
    )
    knobs.add_argument("--writers", type=int, help="overload: closed-loop writers (50)")
    knobs.add_argument(
        "--readers", type=int, help="overload: full-history ListEvents readers (100)"
    )
    knobs.add_argument("--viewers", type=int, help="overload: activity-page SSE viewers (1000)")
    knobs.add_argument("--burst", type=int, help="overload: creates fired at once (3000)")
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
        help="with --spawn (or --naive, --echo, --compare): record the server with py-spy "
        "during each run into DIR",
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


def _server_kind(args: argparse.Namespace) -> ServerKind | None:
    """What this tool starts for a plain run: the real server, echo, naive, or nothing."""
    if args.spawn:
        return "spawn"
    if args.echo:
        return "echo"
    if args.naive:
        return "naive"
    return None


async def _bench(args: argparse.Namespace, uvloop_on: bool) -> int:
    every = compare.SCENARIOS if args.compare else SCENARIOS
    scenarios = list(every) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    given = {knob: getattr(args, knob) for knob in _KNOBS}
    server_env = _pairs(args.server_env, "--server-env")
    redis_config = _pairs(args.redis_config, "--redis-config")
    progress = Progress(enabled=False if args.no_progress else None)
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    if args.compare:
        return await _compare(
            args,
            scenarios,
            given,
            progress,
            server_env=server_env,
            redis_config=redis_config,
            uvloop_on=uvloop_on,
        )
    out = sys.stdout
    kind = _server_kind(args)
    spawned: Spawned | None = None
    results: list[report.Result] = []
    failures = 0
    try:
        if kind is not None:
            spawned = await spawn_stack(kind=kind, server_env=server_env, redis_config=redis_config)
            print(spawned.summary(), file=sys.stderr)
        target = spawned.target if spawned else (args.target or f"{args.address}:{args.port}")
        redis_url = args.redis_url or (spawned.redis_url if spawned else None)
        metrics_url = args.metrics_url or (spawned.metrics_url if spawned else None)
        server = kind or "external"
        for scenario in scenarios:
            first = resolve(scenario, given, target=target)
            first = replace(first, redis_url=redis_url, metrics_url=metrics_url, uvloop=uvloop_on)
            runs = []
            for run in range(max(1, args.runs)):
                profile = args.py_spy / f"{scenario}-{run + 1}.folded" if args.py_spy else None
                result = await measure(
                    for_run(first, run),
                    run + 1,
                    server,
                    spawned,
                    progress,
                    keep=args.keep,
                    profile=profile,
                    native=args.py_spy_native,
                )
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


async def _compare(
    args: argparse.Namespace,
    scenarios: list[str],
    given: dict[str, Any],
    progress: Progress,
    *,
    server_env: dict[str, str],
    redis_config: dict[str, str],
    uvloop_on: bool,
) -> int:
    """``--compare``: each scenario against echo, naive and the real server, interleaved."""
    unfit = [s for s in scenarios if s not in compare.SCENARIOS]
    if unfit:
        print(
            f"activity-bench: --compare runs {', '.join(compare.SCENARIOS)}; "
            f"not {', '.join(unfit)}",
            file=sys.stderr,
        )
        return 2
    out = sys.stdout

    def emit(result: report.Result) -> None:
        if args.json:
            report.emit_json(result, out)

    comparing = compare.Comparison(
        progress,
        emit,
        keep=args.keep,
        server_env=server_env,
        redis_config=redis_config,
        profile_dir=args.py_spy,
        native=args.py_spy_native,
    )
    for scenario in scenarios:
        # The target is a placeholder: each server started gets its own port.
        first = replace(resolve(scenario, given, target="-"), uvloop=uvloop_on)
        await comparing.scenario(first, args.runs)
    text = (
        report.table(comparing.results)
        + "\n"
        + "\n".join(compare.summary(c) for c in comparing.comparisons)
    )
    print(text, file=sys.stderr if args.json else out)
    return 1 if comparing.failures else 0


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
