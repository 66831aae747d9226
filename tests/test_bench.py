"""activity-bench: every scenario against a real server and Redis, with tiny counts.

The tool runs as a subprocess exactly as a user runs it (``python -m
activity_events.bench``), so its argument parsing, JSON lines and exit code
are what is tested; the server is the in-process ``server`` fixture (or the
tool's own ``--spawn``/``--echo`` processes).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.bench import report
from activity_events.bench.compare import comparison
from activity_events.bench.h2load import grpc_frame
from activity_events.bench.naive import PAGE, NaiveServer, events_key
from activity_events.bench.profiler import top_functions
from activity_events.bench.progress import Progress
from activity_events.bench.scenarios import cursor_ms, make_message
from activity_events.bench.sideport import SidePort, SidePortError, handled_counts, status_of
from activity_events.bench.stats import latency_fields, percentile
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

BENCH_TIMEOUT_S = 60.0
OVERLOAD_TIMEOUT_S = 120.0  # four phases, follower processes and a 10 s RSS settle
SPAWNED = re.compile(r"spawned (?:redis pid (\d+), )?server pid (\d+)")
COMMON_FIELDS = (
    "scenario", "run", "target", "server", "count", "concurrency", "connections",
    "message_size", "deployments", "base", "events", "seconds", "events_per_s", "uvloop",
)  # fmt: skip


async def run_bench(
    *argv: str, timeout: float = BENCH_TIMEOUT_S
) -> tuple[int, list[dict[str, Any]], str]:
    """Runs the tool; returns its exit code, its JSON lines and its stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "activity_events.bench", "--json", "--no-progress", *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    return process.returncode, lines, stderr.decode()


def assert_ordered_latencies(result: dict[str, Any], prefix: str = "") -> None:
    p50, p99 = result[f"{prefix}p50_ms"], result[f"{prefix}p99_ms"]
    assert 0 <= p50 <= result[f"{prefix}p90_ms"] <= p99 <= result[f"{prefix}p999_ms"]
    assert p99 <= result[f"{prefix}max_ms"]


def by_scenario(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["scenario"]: line for line in lines}


async def test_every_scenario_reports_its_fields(server: Any, redis_server: Any) -> None:
    code, lines, stderr = await run_bench(
        "--target", f"127.0.0.1:{server.port}",
        "--redis-url", redis_server.url,
        "--count", "300", "--concurrency", "4", "--connections", "2",
        "--batch", "100", "--fill-batch", "100", "--deployments", "3",
        "--followers", "12", "--rate", "60", "--duration", "1", "--drain-timeout", "5",
        "--timeout", "10",
        "create", "ingest", "list", "replay", "follow", "memory", "subscribe",
    )  # fmt: skip
    assert code == 0, stderr
    results = by_scenario(lines)
    assert list(results) == [
        "create", "ingest", "list", "replay", "follow", "memory", "subscribe",
    ]  # fmt: skip
    for result in lines:
        assert "error" not in result, result
        for name in COMMON_FIELDS:
            assert name in result, (result["scenario"], name)
        assert result["run"] == 1
        assert result["server"] == "external"
        assert result["events"] > 0
        assert result["client_cpu_pct"] >= 0
    # The human table goes to stderr when stdout carries JSON.
    assert "events/s" in stderr and "follow" in stderr

    create = results["create"]
    assert create["events"] == 300 and create["errors"] == 0 and create["duplicates"] == 0
    assert create["events_per_s"] > 0 and create["p50_ms"] > 0
    assert_ordered_latencies(create)

    ingest = results["ingest"]
    assert ingest["created"] == 300 and ingest["events"] == 300 and ingest["batch"] == 100
    assert ingest["conflicts"] == 0 and ingest["errors"] == 0 and ingest["events_per_s"] > 0
    assert_ordered_latencies(ingest, "batch_")

    for name in ("list", "replay"):
        result = results[name]
        assert result["complete"] is True, result
        assert result["streams"] == 4
        assert result["events"] == 4 * 300
        assert result["events_per_s"] > 0 and result["per_stream_events_per_s"] > 0
    assert results["list"]["messages"] == results["list"]["events"]
    assert results["replay"]["events_per_message"] > 1

    follow = results["follow"]
    assert follow["events"] == 60 and follow["write_errors"] == 0
    assert follow["followers"] == 12 and follow["followers_caught_up"] == 12
    # 60 events over 3 deployments, 4 followers per deployment: 12 x 20 deliveries.
    assert follow["expected_deliveries"] == 240
    assert follow["deliveries"] == 240 and follow["drops"] == 0 and follow["repeats"] == 0
    assert follow["followers_exhausted"] == 0
    assert_ordered_latencies(follow)
    assert 0 < follow["receive_p50_ms"] <= follow["receive_p99_ms"]
    # Same clock, and a send precedes its receive: end-to-end is never shorter.
    assert follow["send_p50_ms"] >= follow["receive_p50_ms"]
    assert follow["redis_connections_max"] >= 1

    memory = results["memory"]
    assert memory["events"] == 3 * 300
    assert memory["protobuf_bytes_per_event"] > 32  # the 32-byte message plus the other fields
    assert memory["bytes_per_event"] > memory["protobuf_bytes_per_event"] * 0.5
    assert memory["ratio_to_protobuf"] == pytest.approx(
        memory["bytes_per_event"] / memory["protobuf_bytes_per_event"], rel=0.02
    )
    assert memory["events_bytes"] > 0 and memory["ids_bytes"] > 0

    subscribe = results["subscribe"]
    assert subscribe["events"] == 300 and subscribe["consumers"] == 4
    assert subscribe["duplicates"] == 0
    assert subscribe["events_per_s"] == subscribe["acked_events_per_s"] > 0


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.lower()
    except OSError:
        return "gone"
    return ""


async def test_spawn_runs_repeats_reports_medians_and_stops_its_processes() -> None:
    code, lines, stderr = await run_bench(
        "--spawn", "--runs", "2", "--count", "100", "--concurrency", "4", "--connections", "1",
        "create",
    )  # fmt: skip
    assert code == 0, stderr
    assert [line["run"] for line in lines] == [1, 2, "median"]
    first, second, median = lines
    assert first["server"] == "spawn"
    assert first["base"] != second["base"]  # repeated runs write their own deployments
    assert first["events"] == second["events"] == 100
    assert median["runs"] == 2 and median["failed_runs"] == 0
    assert min(first["p99_ms"], second["p99_ms"]) <= median["p99_ms"]
    assert median["p99_ms"] <= max(first["p99_ms"], second["p99_ms"])
    assert first["server_startup_s"] > 0
    assert first["server_cpu_pct"] is not None and first["redis_cpu_pct"] is not None
    assert first["server_cpu_us_per_event"] > 0 and first["client_cpu_us_per_event"] > 0
    match = re.search(r"spawned redis pid (\d+), server pid (\d+)", stderr)
    assert match, stderr
    for pid in map(int, match.groups()):
        assert not _pid_exists(pid), f"spawned pid {pid} still running"


async def test_echo_server_gives_the_client_ceiling_and_memory_needs_redis() -> None:
    code, lines, stderr = await run_bench(
        "--echo", "--count", "200", "--concurrency", "8", "--connections", "2",
        "create", "memory",
    )  # fmt: skip
    results = by_scenario(lines)
    assert results["create"]["server"] == "echo"
    assert results["create"]["events"] == 200 and results["create"]["events_per_s"] > 0
    # Without Redis access memory cannot measure: it says so, and the exit code tells.
    assert "memory needs Redis access" in results["memory"]["error"]
    assert code == 1, stderr


def spawned_pids(stderr: str) -> list[int]:
    """Every PID the tool announced ("spawned redis pid X, server pid Y" per start)."""
    return [int(pid) for match in SPAWNED.findall(stderr) for pid in match if pid]


def assert_all_gone(pids: list[int]) -> None:
    for pid in pids:
        assert not _pid_exists(pid), f"spawned pid {pid} still running"


needs_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None and not os.environ.get("CI"),
    reason="h2load (nghttp2-client) not installed; `make test` installs it, and CI requires it",
)


# --- the naive server -------------------------------------------------------------


async def test_naive_server_stores_one_entry_per_event_and_pages_reads(
    redis_server: Any, redis_client: redis_asyncio.Redis
) -> None:
    server = NaiveServer(redis_server.url, 0)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ActivityEventsStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            sent = pb.EventRequest(
                id=7, message="hello", deployment_id=42, timestamp=pb.Timestamp(send=123)
            )
            response = await stub.CreateEvent(sent, timeout=5)
            entries = await redis_client.xrange(events_key(42))
            [(entry_id, fields)] = entries
            assert response.success and response.id == 7
            assert response.cursor == f"42:{entry_id.decode()}"
            assert list(fields) == [b"e"]
            stored = pb.EventRequest.FromString(fields[b"e"])
            assert (stored.id, stored.message, stored.deployment_id) == (7, "hello", 42)
            assert stored.timestamp.send == 123 and stored.timestamp.receive > 0

            # One XADD per event (no dedup: the same event twice is stored twice), more
            # than one XRANGE page, read back in order by both read methods.
            batch = [
                pb.EventRequest(id=k % 600 + 1, message=f"m{k}", deployment_id=42)
                for k in range(PAGE + 200)
            ]
            created = await stub.CreateEvents(pb.CreateEventsRequest(events=batch), timeout=10)
            assert [r.outcome for r in created.results] == [pb.OUTCOME_CREATED] * len(batch)
            assert [r.index for r in created.results] == list(range(len(batch)))
            assert len({r.cursor for r in created.results}) == len(batch)
            assert await redis_client.xlen(events_key(42)) == len(batch) + 1

            listed = [e async for e in stub.ListEvents(pb.Deployment(id=42), timeout=10)]
            assert [e.message for e in listed] == ["hello"] + [e.message for e in batch]
            pages = [
                page
                async for page in stub.WatchEvents(
                    pb.WatchEventsRequest(deployment_id=42), timeout=10
                )
            ]
            assert [len(page.events) for page in pages] == [PAGE, 201]
            watched = [s for page in pages for s in page.events]
            assert [s.event.message for s in watched] == [e.message for e in listed]
            assert watched[1].cursor == created.results[0].cursor

            with pytest.raises(grpc.aio.AioRpcError) as raised:
                follow = pb.WatchEventsRequest(deployment_id=42, follow=True)
                async for _ in stub.WatchEvents(follow, timeout=5):
                    pass
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop()


async def test_naive_flag_runs_the_scenarios_against_the_naive_server() -> None:
    code, lines, stderr = await run_bench(
        "--naive", "--count", "300", "--concurrency", "4", "--connections", "2",
        "create", "list", "overload",
    )  # fmt: skip
    results = by_scenario(lines)
    create, listed = results["create"], results["list"]
    for result in (create, listed):
        assert "error" not in result, result
        assert result["server"] == "naive"
        for name in COMMON_FIELDS:
            assert name in result, (result["scenario"], name)
        assert result["server_cpu_us_per_event"] > 0 and result["redis_cpu_pct"] is not None
    assert create["events"] == 300 and create["errors"] == 0 and create["duplicates"] == 0
    assert_ordered_latencies(create)
    # list filled the naive server's Redis through CreateEvents and read every event back.
    assert listed["complete"] is True and listed["events"] == 4 * 300
    # overload needs the real server's side port: it says so, and the exit code tells.
    assert "--metrics-url" in results["overload"]["error"]
    assert code == 1, stderr
    pids = spawned_pids(stderr)
    assert len(pids) == 2, stderr
    assert_all_gone(pids)

    code, _, stderr = await run_bench("--naive", "--echo", "create")
    assert code == 2 and "not allowed with argument" in stderr


# --- --compare ---------------------------------------------------------------------


async def test_compare_interleaves_three_servers_and_reports_ratios_of_medians() -> None:
    code, lines, stderr = await run_bench(
        "--compare", "--runs", "1", "--count", "200", "--concurrency", "4",
        "--connections", "1", "create", "list",
    )  # fmt: skip
    assert code == 0, stderr
    for scenario in ("create", "list"):
        mine = [line for line in lines if line["scenario"] == scenario]
        runs = [line for line in mine if line.get("run") == 1]
        medians = {line["server"]: line for line in mine if line.get("run") == "median"}
        [compared] = [line["comparison"] for line in mine if "comparison" in line]
        # One run of each, in the order echo, naive, real, then the medians.
        assert [r["server"] for r in runs] == ["echo", "naive", "spawn"]
        assert list(medians) == ["echo", "naive", "spawn"]
        assert len({r["target"] for r in runs}) == 3  # three servers, three ports
        for result in runs:
            assert "error" not in result, result
            assert result["events_per_s"] > 0 and result["server_cpu_us_per_event"] > 0
        assert "redis_cpu_pct" not in runs[0] and runs[1]["redis_cpu_pct"] is not None
        eps = {server: median["events_per_s"] for server, median in medians.items()}
        assert compared["events_per_s"] == eps
        assert compared["ratio_to_echo"] == pytest.approx(eps["spawn"] / eps["echo"], abs=1e-3)
        assert compared["ratio_to_naive"] == pytest.approx(eps["spawn"] / eps["naive"], abs=1e-3)
        assert compared["ratio_to_echo"] > 0 and compared["ratio_to_naive"] > 0
        cpu = compared["server_cpu_us_per_event"]
        assert cpu == {s: m["server_cpu_us_per_event"] for s, m in medians.items()}
        if scenario == "create":
            p99 = {server: median["p99_ms"] for server, median in medians.items()}
            assert compared["p99_ratio_to_echo"] == pytest.approx(
                p99["spawn"] / p99["echo"], abs=1e-3
            )
        else:
            assert runs[2]["complete"] is True and "p99_ratio_to_echo" not in compared
    assert "spawn/echo" in stderr  # the human summary under the table
    pids = spawned_pids(stderr)
    assert len(pids) == 2 * 5, stderr  # per scenario: echo, naive + Redis, real + Redis
    assert_all_gone(pids)

    code, _, stderr = await run_bench("--compare", "follow")
    assert code == 2 and "not follow" in stderr


@needs_h2load
async def test_compare_drives_create_with_h2load() -> None:
    code, lines, stderr = await run_bench(
        "--compare", "--client", "h2load", "--count", "300", "--concurrency", "8",
        "--connections", "2", "create",
    )  # fmt: skip
    assert code == 0, stderr
    runs = [line for line in lines if line.get("run") == 1]
    assert [r["server"] for r in runs] == ["echo", "naive", "spawn"]
    for result in runs:
        assert result["client"] == "h2load"
        assert result["requests"] == 300 and result["events"] == 300 and result["errors"] == 0
    [compared] = [line["comparison"] for line in lines if "comparison" in line]
    assert compared["ratio_to_echo"] > 0 and compared["p99_ratio_to_echo"] > 0
    assert_all_gone(spawned_pids(stderr))


def test_comparison_is_of_medians_and_skips_failed_servers() -> None:
    medians = {
        "echo": {"events_per_s": 400.0, "p99_ms": 10.0, "server_cpu_us_per_event": 300.0},
        "naive": {"error": "SpawnError: no redis-server", "run": "median"},
        "spawn": {"events_per_s": 100.0, "p99_ms": 25.0, "server_cpu_us_per_event": 600.0},
    }
    compared = comparison("create", medians)["comparison"]
    assert compared["ratio_to_echo"] == 0.25 and compared["ratio_to_naive"] is None
    assert compared["p99_ratio_to_echo"] == 2.5
    assert compared["server_cpu_us_per_event"] == {"echo": 300.0, "naive": None, "spawn": 600.0}
    reads = comparison("list", {s: {"events_per_s": 1.0} for s in ("echo", "naive", "spawn")})
    assert "p99_ratio_to_echo" not in reads["comparison"]


# --- overload -------------------------------------------------------------------------


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_counts(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_count(n) for k, n in value.items()
    )


@pytest.mark.parametrize("client", ["h2load", "grpc"])
async def test_overload_reports_every_phase(client: str) -> None:
    """With h2load the readers and page viewers are h2load processes (what each
    viewer received is then unknown); with grpc, grpc.aio readers and asyncio viewers."""
    code, lines, stderr = await run_bench(
        "--spawn", "--writers", "4", "--duration", "1", "--count", "2000", "--readers", "4",
        "--viewers", "5", "--followers", "5", "--burst", "50", "--timeout", "20",
        "--client", client, "overload",
        timeout=OVERLOAD_TIMEOUT_S,
    )  # fmt: skip
    assert code == 0, stderr
    [result] = lines
    assert "error" not in result, result
    for name in COMMON_FIELDS:
        assert name in result, name
    assert result["server"] == "spawn" and result["writers"] == 4

    counts = (
        "readers_ok", "readers_resource_exhausted", "readers_running", "health_checks",
        "health_not_serving", "viewers_open", "followers_open", "followers_caught_up",
        "viewer_health_not_serving",
    )  # fmt: skip
    for name in counts:
        assert _is_count(result[name]), (name, result[name])
    assert result["reader_client"] == client
    assert result["viewer_client"] == ("h2load" if client == "h2load" else "python")
    for name in ("viewers_dropped", "viewers_reset", "viewer_bytes"):
        if client == "h2load":
            assert result[name] is None, name  # h2load does not say
        else:
            assert _is_count(result[name]), (name, result[name])
    by_code = (
        "idle_write_errors", "storm_write_errors", "viewer_write_errors", "readers_other",
        "viewers_refused", "followers_ended", "burst_codes",
    )  # fmt: skip
    for name in by_code:
        assert _is_counts(result[name]), (name, result[name])
    for name in ("rss_idle_mb", "rss_max_mb", "rss_after_mb", "viewer_rss_max_mb"):
        assert isinstance(result[name], float) and result[name] > 0, name
    for phase in ("idle", "storm", "viewer"):
        assert isinstance(result[f"{phase}_writes_per_s"], float)
        assert result[f"{phase}_write_p99_ms"] >= 0

    # a. idle writes are the yardstick; the ratios are of the phases' own rates.
    idle = result["idle_writes_per_s"]
    assert idle > 0 and result["events_per_s"] == idle
    assert result["events"] == pytest.approx(idle * result["seconds"], abs=1)
    for phase in ("storm", "viewer"):
        assert result[f"{phase}_write_ratio"] == pytest.approx(
            result[f"{phase}_writes_per_s"] / idle, abs=1e-3
        )
    # b. every reader is accounted for, by the server's own metrics.
    assert result["reader_client"] in ("h2load", "grpc")
    readers = (
        result["readers_ok"] + result["readers_resource_exhausted"]
        + sum(result["readers_other"].values()) + result["readers_running"]
    )  # fmt: skip
    assert readers == 4 and result["readers_ok"] >= 1
    assert result["health_checks"] >= 1 and result["health_not_serving"] <= result["health_checks"]
    assert result["rss_max_mb"] >= result["rss_idle_mb"] * 0.9
    # c. every viewer and follower has an outcome, and the small storm was served.
    assert result["viewers_open"] + sum(result["viewers_refused"].values()) == 5
    assert result["followers_open"] + sum(result["followers_ended"].values()) == 5
    assert result["viewers_open"] == 5 and result["followers_open"] >= 1
    if client == "grpc":
        assert result["viewer_bytes"] > 0
    # d. a burst is answered, and only with OK or RESOURCE_EXHAUSTED.
    burst = result["burst_codes"]
    assert set(burst) <= {"OK", "RESOURCE_EXHAUSTED"} and sum(burst.values()) == 50
    assert "overload" in stderr and "burst_codes=" in stderr
    pids = spawned_pids(stderr)
    assert len(pids) == 2, stderr
    assert_all_gone(pids)


def test_handled_counts_reads_one_method_in_grpc_names() -> None:
    text = "\n".join(
        [
            "# HELP grpc_server_handled_total Total number of RPCs completed on the server.",
            "# TYPE grpc_server_handled_total counter",
            'grpc_server_handled_total{grpc_code="OK",grpc_method="ListEvents",'
            'grpc_service="activityevents.ActivityEvents",grpc_type="server_stream"} 3.0',
            'grpc_server_handled_total{grpc_code="ResourceExhausted",grpc_method="ListEvents",'
            'grpc_service="activityevents.ActivityEvents",grpc_type="server_stream"} 1e+03',
            'grpc_server_handled_total{grpc_code="Canceled",grpc_method="ListEvents",'
            'grpc_service="activityevents.ActivityEvents",grpc_type="server_stream"} 0.0',
            'grpc_server_handled_total{grpc_code="OK",grpc_method="CreateEvent",'
            'grpc_service="activityevents.ActivityEvents",grpc_type="unary"} 99.0',
            'grpc_server_started_total{grpc_method="ListEvents",grpc_service="x",'
            'grpc_type="server_stream"} 50.0',
        ]
    )
    counts = handled_counts(text, "ListEvents")
    assert counts == {"OK": 3, "RESOURCE_EXHAUSTED": 1000, "CANCELLED": 0}
    assert handled_counts(text, "WatchEvents") == {}


def test_side_port_urls_and_status_lines() -> None:
    assert SidePort.from_url("http://127.0.0.1:9464") == SidePort("127.0.0.1", 9464)
    assert SidePort.from_url("localhost:8080") == SidePort("localhost", 8080)
    with pytest.raises(SidePortError):
        SidePort.from_url("https://example.com:9464")
    assert status_of(b"HTTP/1.1 503 Service Unavailable\r\n") == 503
    assert status_of(b"") == 0 and status_of(b"garbage") == 0


@needs_h2load
async def test_create_with_h2load_counts_what_the_server_stored(server: Any) -> None:
    code, lines, stderr = await run_bench(
        "--target", f"127.0.0.1:{server.port}", "--client", "h2load",
        "--count", "300", "--concurrency", "8", "--connections", "2", "create",
    )  # fmt: skip
    assert code == 0, stderr
    (result,) = lines
    assert result["client"] == "h2load"
    assert result["requests"] == 300 and result["http_errors"] == 0
    assert result["events"] == 300 and result["errors"] == 0
    assert_ordered_latencies(result)


@needs_h2load
@pytest.mark.parametrize("scenario", ["list", "replay"])
async def test_history_readers_with_h2load_get_every_byte(server: Any, scenario: str) -> None:
    """h2load reads streams it cannot decode: a run counts as complete only when
    it received exactly the bytes of that many whole histories."""
    code, lines, stderr = await run_bench(
        "--target", f"127.0.0.1:{server.port}", "--client", "h2load",
        "--count", "700", "--concurrency", "3", "--connections", "2", scenario,
    )  # fmt: skip
    assert code == 0, stderr
    (result,) = lines
    assert result["client"] == "h2load" and result["streams"] == 3
    assert result["complete"] is True, result
    assert result["events"] == 3 * 700
    assert result["data_bytes"] == result["expected_data_bytes"] > 3 * 700 * 5


@needs_h2load
async def test_history_readers_with_h2load_read_one_deployment(server: Any) -> None:
    _, lines, _ = await run_bench(
        "--target", f"127.0.0.1:{server.port}", "--client", "h2load",
        "--count", "10", "--deployments", "2", "list",
    )  # fmt: skip
    (result,) = lines
    assert "--deployments 1" in result["error"]


# --- pure helpers ----------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 99.9) == 100.0
    assert percentile([], 50) == 0.0
    fields = latency_fields([1_000_000, 2_000_000, 3_000_000], prefix="x_")
    assert fields["x_p50_ms"] == 2.0 and fields["x_max_ms"] == 3.0 and fields["x_mean_ms"] == 2.0


def test_cursor_ms_reads_the_entry_id_millisecond() -> None:
    assert cursor_ms("42:1764370000000-3") == 1764370000000
    assert cursor_ms("1764370000000-0") == 1764370000000
    assert cursor_ms("garbage") is None


def test_messages_have_the_requested_size() -> None:
    assert len(make_message(32, 123456).encode()) == 32
    assert len(make_message(4, 123456)) == 4
    assert make_message(32, 1) != make_message(32, 2)


def test_grpc_frame_is_length_prefixed() -> None:
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_median_result_takes_medians_of_numbers_only() -> None:
    runs = [
        {"scenario": "create", "run": 1, "events_per_s": 10.0, "complete": True, "p99_ms": 5.0},
        {"scenario": "create", "run": 2, "events_per_s": 30.0, "complete": True, "p99_ms": 1.0},
        {"scenario": "create", "run": 3, "events_per_s": 20.0, "complete": False, "p99_ms": 3.0},
    ]
    median = report.median_result(runs)
    assert median["events_per_s"] == 20.0 and median["p99_ms"] == 3.0
    assert median["complete"] is True and median["run"] == "median" and median["runs"] == 3
    assert "create" in report.table([*runs, median])


def test_median_result_skips_failed_runs() -> None:
    runs = [
        {"scenario": "create", "run": 1, "error": "UNAVAILABLE: redis did not answer"},
        {"scenario": "create", "run": 2, "events_per_s": 10.0},
        {"scenario": "create", "run": 3, "events_per_s": 30.0},
    ]
    median = report.median_result(runs)
    assert "error" not in median
    assert median["events_per_s"] == 20.0 and median["failed_runs"] == 1
    assert "error" in report.median_result(runs[:1])


def test_top_functions_ranks_own_and_inclusive_samples(tmp_path: Path) -> None:
    folded = tmp_path / "x.folded"
    folded.write_text(
        "process 1:thread 2;main (a.py:1);handle (b.py:10);encode (c.py:5) 6\n"
        "process 1:thread 2;main (a.py:1);handle (b.py:12) 4\n"
    )
    total, rows = top_functions(folded)
    assert total == 10
    assert rows[0] == ("encode (c.py)", 60.0, 60.0)
    assert rows[1] == ("handle (b.py)", 40.0, 100.0)


def test_progress_line_shows_rate_and_fraction() -> None:
    progress = Progress(enabled=False)
    progress.begin("create", 200)
    progress.advance(50)
    assert "25.0%" in progress.line() and "50/200" in progress.line()


async def test_spawned_redis_has_the_recommended_settings_unless_overridden() -> None:
    """memory reports the stream node size it measured with: the recommended
    16 KB by default, Redis' own 4 KB when asked for (docs/operations.md, "Redis settings")."""
    for extra, expected in (([], 16384), (["--redis-config", "stream-node-max-bytes=4096"], 4096)):
        code, lines, stderr = await run_bench(
            "--spawn", "--count", "300", "--concurrency", "2", "--connections", "1",
            *extra, "memory",
        )  # fmt: skip
        assert code == 0, stderr
        [result] = lines
        assert result["stream_node_max_bytes"] == expected
        assert result["stream_node_max_entries"] == 1000
    code, _, stderr = await run_bench("--spawn", "--redis-config", "oops", "memory")
    assert code != 0 and "--redis-config expects NAME=VALUE" in stderr
