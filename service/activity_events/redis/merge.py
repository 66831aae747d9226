"""Every deployment's history as one stream, in arrival order, in bounded memory.

"All deployments" listings (legacy ``ListEvents{id: 0}``, ``WatchEvents`` of
deployment 0) merge the deployments' streams by entry id, ties by deployment
id: a k-way merge with one small buffer per deployment, refilled from Redis
when it runs dry. The buffers together hold at most about ``budget_bytes``
(the reader's ``stream_buffer_bytes``), but never fewer than
:data:`MIN_PER_DEPLOYMENT` entries per deployment, which a merge needs to see
every deployment's next event: with very many deployments that floor, not the
budget, is the bound.
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from activity_events.domain.events import Cursor, StoredEvent

if TYPE_CHECKING:
    from activity_events.redis.store import EventStore

MIN_PER_DEPLOYMENT = 2
"""Fewest entries buffered per deployment (refilled in pages of at least this)."""


async def history_all(
    store: EventStore, after: Cursor | None, budget_bytes: int, out_page: int
) -> AsyncIterator[list[StoredEvent]]:
    """Pages (of up to ``out_page`` events) of every deployment's history merged
    in arrival order; resuming from a cursor continues strictly after it."""
    ids = await store.deployment_ids()
    if not ids:
        return
    per = max(MIN_PER_DEPLOYMENT, store.page_count(budget_bytes) // len(ids))

    def start(d: int) -> str:
        if after is None:
            return "-"
        # Same entry id: deployments ordered after the cursor's come after it.
        return after.entry_id if d > after.deployment_id else "(" + after.entry_id

    buffers: dict[int, list[StoredEvent]] = {}
    positions: dict[int, int] = {}
    heap: list[tuple[tuple[int, int, int], int]] = []
    firsts = await store.first_pages(ids, [start(d) for d in ids], per)
    for d, rows in zip(ids, firsts, strict=True):
        if rows:
            buffers[d], positions[d] = rows, 0
            heap.append((rows[0].cursor.key(), d))
    heapq.heapify(heap)
    batch: list[StoredEvent] = []
    while heap:
        _, d = heapq.heappop(heap)
        rows, pos = buffers[d], positions[d]
        batch.append(rows[pos])
        pos += 1
        if pos == len(rows):
            rows = await store.read_page(d, rows[-1].cursor, per) if len(rows) == per else []
            pos = 0
            buffers[d] = rows
        positions[d] = pos
        if rows:
            heapq.heappush(heap, (rows[pos].cursor.key(), d))
        if len(batch) >= out_page:
            yield batch
            batch = []
    if batch:
        yield batch
