"""Group commit: concurrent single writes sent to Redis together.

A Redis round trip costs this process far more CPU than gRPC's per-call share,
so unary creates that arrive while one is out are gathered and sent as one
batch (one pipelined round trip, one script call per deployment) when it
returns. While creates arrive close together a batch also lingers a little
for more; a lone create is sent at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

COALESCE_MAX = 512
"""Most concurrent unary creates sent to Redis in one round trip."""

FLUSHES_IN_FLIGHT = 1
"""Round trips of coalesced creates in flight at once. While one is, new creates
wait for the next (group commit): under load batches grow instead of round trips
multiplying, and a lone create still goes out at once."""

LINGER_SECONDS = 0.003
"""Longest a create waits for others to share its round trip, and only while
creates arrive more often than that (a lone create is sent at once). A Redis
round trip costs this process far more CPU than gRPC's per-call share, so under
load a millisecond or two of latency buys several times the throughput."""

ARRIVAL_SMOOTHING = 0.2
"""Weight of the newest gap in the moving average of gaps between creates."""


class GroupCommit(Generic[Item, Result]):
    """Items submitted one at a time, sent by ``send`` in batches (one result per
    item, in order).

    While FLUSHES_IN_FLIGHT batches are out, new items gather for the next.
    While items arrive faster than LINGER_SECONDS/2 apart, a batch also waits
    until its oldest item is LINGER_SECONDS old (or COALESCE_MAX are in), so
    under load one round trip carries many items instead of two or three; a
    lone item is sent at once. A failed batch fails each of its callers with
    the same error; a caller that left is skipped.
    """

    def __init__(self, send: Callable[[list[Item]], Awaitable[list[Result]]]) -> None:
        self._send = send
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flush_scheduled = False
        self._pending_since = 0.0
        """When the oldest pending item arrived (event-loop time)."""
        self._flushes: set[asyncio.Task[None]] = set()
        self._last_arrival = 0.0
        self._gap = 1.0
        """Moving average of the seconds between items (see LINGER_SECONDS)."""

    async def submit(self, item: Item) -> Result:
        """Send ``item`` with the others of its batch; its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        now = loop.time()
        gap = min(1.0, now - self._last_arrival)
        self._last_arrival = now
        self._gap += ARRIVAL_SMOOTHING * (gap - self._gap)
        if not self._pending:
            self._pending_since = now
        self._pending.append((item, future))
        if len(self._pending) >= COALESCE_MAX and len(self._flushes) < FLUSHES_IN_FLIGHT:
            self._start_flush()
        elif not self._flush_scheduled and len(self._flushes) < FLUSHES_IN_FLIGHT:
            self._schedule_flush(loop, now)
        return await future

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """Flush the pending items now or, under load, once the oldest has lingered."""
        self._flush_scheduled = True
        wait = LINGER_SECONDS - (now - self._pending_since)
        if self._gap < LINGER_SECONDS / 2 and wait > 0:
            loop.call_later(wait, self._start_flush)
        else:
            loop.call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        while self._pending and len(self._flushes) < FLUSHES_IN_FLIGHT:
            batch, self._pending = self._pending[:COALESCE_MAX], self._pending[COALESCE_MAX:]
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if not self._pending or self._flush_scheduled:
            return
        if len(self._pending) >= COALESCE_MAX:
            self._start_flush()
        else:
            loop = asyncio.get_running_loop()
            self._schedule_flush(loop, loop.time())

    async def _flush(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        live = [item for item, future in batch if not future.done()]
        futures = [future for _, future in batch if not future.done()]
        if not live:
            return
        try:
            results = await self._send(live)
        except BaseException as error:  # handed to every waiting caller
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)
