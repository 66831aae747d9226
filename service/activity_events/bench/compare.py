"""``--compare``: the real server beside the echo server and the naive server.

A figure of the real server alone says little on a machine whose speed
drifts by up to 2x within minutes; its ratio to what the client can drive
(the echo server, `activity_events.bench.echo`) and to the obvious design
(the naive server, `activity_events.bench.naive`) says what the server's
design is worth. Ratios are only fair if drift hits all three alike, so each
run starts, measures and stops the three in turn (echo, naive, real) before
the next run begins, and the ratios are of the medians over the runs.

Every server is started fresh for its run (its own Redis for naive and
real), so no run inherits another's data or warm caches; ``list`` and
``replay`` fill each server's own store first (CreateEvents) and measure only
the reads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from activity_events.bench import report
from activity_events.bench.options import Options, for_run
from activity_events.bench.progress import Progress
from activity_events.bench.runner import describe, measure
from activity_events.bench.spawn import ServerKind, Spawned, SpawnError, spawn_stack

SERVERS: tuple[ServerKind, ...] = ("echo", "naive", "spawn")
"""The servers compared, in the order each run starts them; "spawn" is the real one."""

SCENARIOS = ("create", "ingest", "list", "replay")
"""Scenarios every compared server can serve: the naive server cannot follow or
subscribe, and memory and overload measure the real server's own keys and ports."""

REAL: ServerKind = "spawn"


def _ratio(numerator: object, denominator: object) -> float | None:
    """numerator / denominator when both are numbers and the denominator is positive."""
    if (
        isinstance(numerator, int | float)
        and isinstance(denominator, int | float)
        and denominator > 0
    ):
        return round(numerator / denominator, 3)
    return None


def comparison(scenario: str, medians: dict[str, report.Result]) -> report.Result:
    """The comparison object of one scenario from each server's median result.

    ``ratio_to_echo``/``ratio_to_naive`` are the real server's median
    events/s over the echo's and the naive's; ``p99_ratio_to_echo``/
    ``p99_ratio_to_naive`` the same for p99_ms (scenarios with call latency:
    create). A server whose runs all failed gives None.
    """

    def by_server(key: str) -> dict[str, Any]:
        return {
            server: None if "error" in median else median.get(key)
            for server, median in medians.items()
        }

    eps = by_server("events_per_s")
    figures: dict[str, Any] = {
        "runs": max((m.get("runs", 1) for m in medians.values()), default=0),
        "events_per_s": eps,
        "ratio_to_echo": _ratio(eps.get(REAL), eps.get("echo")),
        "ratio_to_naive": _ratio(eps.get(REAL), eps.get("naive")),
    }
    if any("p99_ms" in median for median in medians.values()):
        p99 = by_server("p99_ms")
        figures.update(
            p99_ms=p99,
            p99_ratio_to_echo=_ratio(p99.get(REAL), p99.get("echo")),
            p99_ratio_to_naive=_ratio(p99.get(REAL), p99.get("naive")),
        )
    figures["server_cpu_us_per_event"] = by_server("server_cpu_us_per_event")
    figures["redis_cpu_us_per_event"] = by_server("redis_cpu_us_per_event")
    return {"scenario": scenario, "comparison": figures}


def summary(compared: report.Result) -> str:
    """One human line for the table's footer."""
    figures = compared["comparison"]
    eps = ", ".join(
        f"{server} {report.cell(value)}/s" for server, value in figures["events_per_s"].items()
    )
    line = (
        f"{compared['scenario']}: {eps}; spawn/echo {report.cell(figures['ratio_to_echo'])}, "
        f"spawn/naive {report.cell(figures['ratio_to_naive'])}"
    )
    if "p99_ratio_to_echo" in figures:
        line += f"; p99 spawn/echo {report.cell(figures['p99_ratio_to_echo'])}"
    cpu = figures["server_cpu_us_per_event"]
    line += "; server µs/event " + ", ".join(f"{s} {report.cell(v)}" for s, v in cpu.items())
    return line


class Comparison:
    """Runs scenarios against the three servers, interleaved run by run.

    ``emit`` receives every result as soon as it exists (per run, then the
    medians, then the comparison); `results` keeps them for the table.
    """

    def __init__(
        self,
        progress: Progress,
        emit: Callable[[report.Result], None],
        *,
        keep: bool,
        server_env: dict[str, str],
        redis_config: dict[str, str],
        profile_dir: Path | None = None,
        native: bool = False,
    ) -> None:
        self.progress = progress
        self.emit = emit
        self.keep = keep
        self.server_env = server_env
        self.redis_config = redis_config
        self.profile_dir = profile_dir
        self.native = native
        self.results: list[report.Result] = []
        self.comparisons: list[report.Result] = []
        self.failures = 0

    def _record(self, result: report.Result) -> None:
        self.results.append(result)
        self.emit(result)

    async def _one(self, options: Options, run: int, server: ServerKind) -> report.Result:
        spawned: Spawned | None = None
        try:
            spawned = await spawn_stack(
                kind=server, server_env=self.server_env, redis_config=self.redis_config
            )
            print(spawned.summary(), file=sys.stderr)
            options = replace(
                options,
                target=spawned.target,
                redis_url=spawned.redis_url,
                metrics_url=spawned.metrics_url,
            )
            profile = None
            if self.profile_dir is not None:
                profile = self.profile_dir / f"{options.scenario}-{server}-{run}.folded"
            return await measure(
                options,
                run,
                server,
                spawned,
                self.progress,
                keep=self.keep,
                profile=profile,
                native=self.native,
            )
        except SpawnError as exc:
            return {**describe(options, run, server), "error": f"SpawnError: {exc}"}
        finally:
            if spawned is not None:
                spawned.stop()

    async def scenario(self, first: Options, runs: int) -> None:
        """``runs`` rounds of echo, naive, real; then medians and the comparison."""
        per_server: dict[str, list[report.Result]] = {server: [] for server in SERVERS}
        for run in range(max(1, runs)):
            options = for_run(first, run)
            for server in SERVERS:
                result = await self._one(options, run + 1, server)
                self.failures += "error" in result
                per_server[server].append(result)
                self._record(result)
        medians = {server: report.median_result(done) for server, done in per_server.items()}
        for median in medians.values():
            self._record(median)
        compared = comparison(first.scenario, medians)
        self.comparisons.append(compared)
        self.emit(compared)
