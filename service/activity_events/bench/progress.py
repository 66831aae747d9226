"""A progress bar on stderr, shown only when stderr is a terminal.

Scenarios only bump counters (`advance`); a background task redraws at most
five times a second, so the bar costs the load generator next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TextIO

_WIDTH = 30
_REDRAW_S = 0.2


class Progress:
    """Counts work done in the current phase and draws it when enabled."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self.label = ""
        self.total = 0
        self.done = 0
        self._t0 = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def begin(self, label: str, total: int) -> None:
        """Starts a new phase of ``total`` units (0: unknown, shows a count only)."""
        self.label, self.total, self.done = label, total, 0
        self._t0 = time.perf_counter()

    def advance(self, units: int = 1) -> None:
        self.done += units

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = self.done / elapsed
        if self.total > 0:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * _WIDTH)
            bar = "#" * filled + "-" * (_WIDTH - filled)
            return (
                f"{self.label:<14} [{bar}] {frac * 100:5.1f}% "
                f"{self.done}/{self.total} {rate:,.0f}/s {elapsed:5.1f}s"
            )
        return f"{self.label:<14} {self.done} {rate:,.0f}/s {elapsed:5.1f}s"

    async def _draw(self) -> None:
        while True:
            self._stream.write("\r\x1b[2K" + self.line())
            self._stream.flush()
            await asyncio.sleep(_REDRAW_S)

    def start(self) -> None:
        """Starts redrawing (no-op when disabled)."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._draw())

    async def stop(self) -> None:
        """Stops redrawing and clears the line."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
