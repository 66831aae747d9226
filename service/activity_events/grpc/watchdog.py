"""Ends server streams whose client stopped reading (``stream_stall_seconds``).

A server stream only moves when the client reads: HTTP/2 flow control holds
the next message until the client has room, and the handler waits with it.
A client that never reads would keep its stream, its admission slot and the
message it was sent forever. The watchdog notices a stream whose last
message has been waiting for longer than the stall timeout and ends it:

1. the slot is released and the refusal counted (reason ``stalled``);
2. the status RESOURCE_EXHAUSTED goes out with a message that says so and,
   for streams that have cursors, where to resume. It travels behind the
   data already in flight, so a client that resumes reading gets everything
   it was sent, then the status;
3. the handler is cancelled, so nothing more is read or buffered for it;
   if the status could not be written within another stall timeout either,
   the call is dropped (RST_STREAM).

One task checks every stream about four times per timeout, so a stalled
stream ends between ``stall`` and 1.25 × ``stall`` seconds after its last
message was handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

logger = logging.getLogger(__name__)


class Watched:
    """One server stream as the watchdog sees it."""

    __slots__ = ("context", "on_stall", "sending_since", "task")

    def __init__(self, context: Any, task: asyncio.Task[Any] | None, on_stall: Callable[[], str]):
        self.context = context
        self.task = task
        self.on_stall = on_stall
        """Called when the stream stalls; releases what the stream holds and
        answers the status message to send."""
        self.sending_since: float | None = None
        """time.monotonic() when the message now in flight was handed to grpc."""


class StreamWatchdog:
    """Watches every open server stream of a process; see the module docstring."""

    def __init__(self, stall_seconds: float) -> None:
        self.stall_seconds = stall_seconds
        self._streams: set[Watched] = set()
        self._task: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()

    def watch(self, context: Any, on_stall: Callable[[], str]) -> Watched:
        watched = Watched(context, asyncio.current_task(), on_stall)
        self._streams.add(watched)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stream-watchdog")
        return watched

    def forget(self, watched: Watched) -> None:
        self._streams.discard(watched)

    @property
    def watched(self) -> int:
        return len(self._streams)

    async def _run(self) -> None:
        period = max(0.05, self.stall_seconds / 4)
        while True:
            await asyncio.sleep(period)
            deadline = time.monotonic() - self.stall_seconds
            stalled = [
                w
                for w in self._streams
                if w.sending_since is not None and w.sending_since < deadline
            ]
            for watched in stalled:
                self._streams.discard(watched)
                self._end(watched)

    def _end(self, watched: Watched) -> None:
        try:
            message = watched.on_stall()
        except Exception:
            logger.exception("stalled stream could not be released")
            message = "stream stalled: the client stopped reading"
        task = asyncio.create_task(self._abort(watched, message), name="stream-stalled")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _abort(self, watched: Watched, message: str) -> None:
        aborting = asyncio.ensure_future(
            watched.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        )
        # Give the status batch a moment to be queued behind the data, then
        # stop the handler: it waits for a send that may never complete.
        await asyncio.wait({aborting}, timeout=0.2)
        if watched.task is not None and not watched.task.done():
            watched.task.cancel()
        await asyncio.wait({aborting}, timeout=self.stall_seconds)
        if not aborting.done():
            aborting.cancel()
        with contextlib.suppress(BaseException):
            await aborting

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._ending):
            task.cancel()
        self._streams.clear()
