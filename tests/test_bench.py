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

import pytest

from activity_events.bench import report
from activity_events.bench.h2load import grpc_frame
from activity_events.bench.profiler import top_functions
from activity_events.bench.progress import Progress
from activity_events.bench.scenarios import cursor_ms, make_message
from activity_events.bench.stats import latency_fields, percentile

BENCH_TIMEOUT_S = 60.0
COMMON_FIELDS = (
    "scenario", "run", "target", "server", "count", "concurrency", "connections",
    "message_size", "deployments", "base", "events", "seconds", "events_per_s", "uvloop",
)  # fmt: skip


async def run_bench(*argv: str) -> tuple[int, list[dict[str, Any]], str]:
    """Runs the tool; returns its exit code, its JSON lines and its stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "activity_events.bench", "--json", "--no-progress", *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), BENCH_TIMEOUT_S)
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


@pytest.mark.skipif(
    shutil.which("h2load") is None and not os.environ.get("CI"),
    reason="h2load (nghttp2-client) not installed; `make test` installs it, and CI requires it",
)
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
    16 KB by default, Redis' own 4 KB when asked for (README "Redis settings")."""
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
