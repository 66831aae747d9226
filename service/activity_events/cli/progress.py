"""A one-line progress bar for terminals; silent everywhere else.

Drawn on standard error with carriage returns, so it never mixes into piped
output and leaves nothing behind when finished. When standard error is not a
terminal (a pipe, a file, CI logs) nothing is drawn at all.
"""

from __future__ import annotations

import time
from typing import TextIO

#: Redraw at most this often: terminals are slow, imports are fast.
REDRAW_SECONDS = 0.1

BAR_WIDTH = 30


def render(label: str, done_bytes: int, total_bytes: int | None, events: int) -> str:
    """The bar's text without the carriage return: ``import [####----]  40% 1200 events``."""
    if not total_bytes:
        return f"{label} {events} events"
    fraction = min(max(done_bytes / total_bytes, 0.0), 1.0)
    filled = int(fraction * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return f"{label} [{bar}] {fraction * 100:3.0f}% {events} events"


class ProgressBar:
    """Progress of a job measured in bytes of input, counting events on the side."""

    def __init__(self, stream: TextIO, label: str, total_bytes: int | None, enabled: bool) -> None:
        self.stream = stream
        self.label = label
        self.total_bytes = total_bytes
        self.enabled = enabled
        self._last_draw = 0.0
        self._drawn = False

    def update(self, done_bytes: int, events: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_SECONDS:
            return
        self._last_draw = now
        self.stream.write(
            "\r" + render(self.label, done_bytes, self.total_bytes, events) + "\x1b[K"
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar so the summary line starts on a clean line."""
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
