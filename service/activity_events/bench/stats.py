"""Latency percentiles and process accounting for benchmark results.

A benchmark figure is only worth something if it says who was busy: every
measured phase records the CPU time of the load generator (this process) and,
when their PIDs are known (``--spawn``, ``--echo``), of the server and of Redis.
A client near 100 % of a core means the figure is the client's ceiling, not
the server's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_fields(
    samples: Iterable[int] | Iterable[float], prefix: str = "", per_ms: float = 1e6
) -> dict[str, float]:
    """p50/p90/p99/p999/max/mean in milliseconds, keyed ``<prefix>p50_ms`` and so on.

    ``samples`` are in units of ``per_ms`` per millisecond (1e6: nanoseconds).
    """
    values = sorted(samples)
    scale = per_ms
    fields: dict[str, float] = {}
    for name, pct in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9)):
        fields[f"{prefix}{name}_ms"] = round(percentile(values, pct) / scale, 3)
    fields[f"{prefix}max_ms"] = round(values[-1] / scale, 3) if values else 0.0
    fields[f"{prefix}mean_ms"] = round(sum(values) / len(values) / scale, 3) if values else 0.0
    return fields


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of another process (Linux /proc), None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    rest = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / _TICKS


def process_rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MiB (Linux /proc), None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Meter:
    """Wall time and CPU use of the client and of known processes over one phase.

    ``pids`` maps a role ("server", "redis") to a PID; each role gets a
    ``<role>_cpu_pct`` field (100 = one core busy for the whole phase).
    """

    pids: dict[str, int] = field(default_factory=dict)
    # Called when the measured phase starts and stops (e.g. to profile just that phase).
    on_start: Callable[[], None] | None = None
    on_stop: Callable[[], None] | None = None
    _wall0: float = 0.0
    _cpu0: float = 0.0
    _others0: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    _fields: dict[str, float | None] = field(default_factory=dict)

    def start(self) -> None:
        if self.on_start is not None:
            self.on_start()
        self._others0 = {role: process_cpu_seconds(pid) for role, pid in self.pids.items()}
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()

    def stop(self) -> float:
        """Ends the phase and returns its wall seconds."""
        self.seconds = max(time.perf_counter() - self._wall0, 1e-9)
        if self.on_stop is not None:
            self.on_stop()
        cpu = time.process_time() - self._cpu0
        self._fields = {"client_cpu_pct": round(100.0 * cpu / self.seconds, 1)}
        for role, pid in self.pids.items():
            before = self._others0.get(role)
            after = process_cpu_seconds(pid)
            self._fields[f"{role}_cpu_pct"] = (
                None
                if before is None or after is None
                else round(100.0 * (after - before) / self.seconds, 1)
            )
        return self.seconds

    def fields(self) -> dict[str, float | None]:
        """The CPU fields of the finished phase."""
        return dict(self._fields)
