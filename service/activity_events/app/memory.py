"""Gives memory back to the operating system once a burst of reads is over.

A storm of history reads makes the process allocate pages, messages and
protocol buffers by the hundred megabytes. Python frees them, but the C
allocator (glibc's malloc) keeps most of the freed memory mapped for reuse,
so the resident size stays at its peak long after: in Kubernetes that looks
like a leak and counts against the pod's memory limit. Whenever reads and
streams were busy and have calmed down, :class:`MemoryTrimmer` runs a full
garbage collection and asks glibc to return what it can (``malloc_trim``).
Both take milliseconds, and they run only after load, never under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
"""How often the trimmer looks at the load."""

CALM = 0.25
"""Load (reads and streams in progress) counts as calmed down once below this
share of its peak since the last trim."""

MIN_PEAK = 4
"""A peak below this is no burst: nothing to trim after it."""


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class MemoryTrimmer:
    """Trims the heap after bursts of load; ``load()`` tells the load now."""

    def __init__(self, load: Callable[[], int], *, check_seconds: float = CHECK_SECONDS) -> None:
        self._load = load
        self._check = check_seconds
        self._trim = _malloc_trim()
        self._peak = 0
        self._task: asyncio.Task[None] | None = None
        self.trims = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="memory-trimmer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._check)
            load = self._load()
            self._peak = max(self._peak, load)
            if self._peak >= MIN_PEAK and load <= self._peak * CALM:
                self.trim()
                self._peak = load

    def trim(self) -> None:
        """Collect garbage and return free heap memory to the OS now."""
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        self.trims += 1
        logger.debug("memory trimmed after load")
