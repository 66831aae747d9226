"""Output of a benchmark run: JSON lines, medians of repeated runs, a human table."""

from __future__ import annotations

import json
import statistics
from typing import Any, TextIO

Result = dict[str, Any]

# Per scenario, the fields that tell its story beyond events/s and p50/p99.
_NOTES: dict[str, tuple[str, ...]] = {
    "create": ("p90_ms", "p999_ms", "errors", "duplicates"),
    "ingest": ("batch", "created", "duplicates", "batch_p99_ms", "errors"),
    "list": ("streams", "per_stream_events_per_s", "complete"),
    "replay": ("streams", "per_stream_events_per_s", "events_per_message", "complete"),
    "follow": (
        "followers",
        "followers_caught_up",
        "drops",
        "followers_exhausted",
        "redis_connections_max",
        "server_rss_mb_max",
    ),
    "memory": ("bytes_per_event", "protobuf_bytes_per_event", "ratio_to_protobuf"),
    "overload": (
        "storm_write_ratio",
        "readers_ok",
        "readers_resource_exhausted",
        "readers_running",
        "health_not_serving",
        "rss_max_mb",
        "viewers_open",
        "followers_open",
        "viewer_write_ratio",
        "burst_codes",
    ),
}


def emit_json(result: Result, stream: TextIO) -> None:
    stream.write(json.dumps(result, default=str) + "\n")
    stream.flush()


def median_result(runs: list[Result]) -> Result:
    """One result whose numbers are the medians of the successful ``runs``.

    Other fields come from the first successful run; failed runs are counted
    in ``failed_runs`` (and the result keeps an ``error`` only if all failed).
    """
    ok = [r for r in runs if "error" not in r]
    merged: Result = dict(ok[0] if ok else runs[0])
    for key, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        if values:
            middle = statistics.median(values)
            merged[key] = round(middle, 3) if isinstance(middle, float) else middle
    merged["run"] = "median"
    merged["runs"] = len(runs)
    merged["failed_runs"] = len(runs) - len(ok)
    return merged


def cell(value: Any) -> str:
    """A number or value as the table shows it (thousands separated, ~3 digits)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict):  # counts by code: OK:2000,RESOURCE_EXHAUSTED:1000
        return ",".join(f"{key}:{count}" for key, count in value.items()) or "-"
    return str(value)


def table(results: list[Result]) -> str:
    """A fixed-column table, one row per result."""
    header = [
        "scenario", "server", "run", "events", "seconds", "events/s", "p50 ms", "p99 ms",
        "client%", "server%", "redis%", "notes",
    ]  # fmt: skip
    rows = [header]
    for r in results:
        if "error" in r:
            notes = f"ERROR: {r['error']}"
        else:
            notes = " ".join(
                f"{key}={cell(r.get(key))}" for key in _NOTES.get(r["scenario"], ()) if key in r
            )
        rows.append(
            [
                r["scenario"],
                cell(r.get("server")),
                cell(r.get("run")),
                cell(r.get("events")),
                cell(r.get("seconds")),
                cell(r.get("events_per_s")),
                cell(r.get("p50_ms")),
                cell(r.get("p99_ms")),
                cell(r.get("client_cpu_pct")),
                cell(r.get("server_cpu_pct")),
                cell(r.get("redis_cpu_pct")),
                notes,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [
            text.rjust(width) if i >= 3 else text.ljust(width)
            for i, (text, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
