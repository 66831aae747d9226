"""What the activity page shows: deployment rows, event pages and live feeds.

History comes from the :class:`~activity_events.redis.store.EventStore`, live events
from the per-replica :class:`~activity_events.live.hub.Hub`, exactly like gRPC
followers, so a browser costs no Redis connection of its own and sees events
created through any replica.

Two live feeds, both Server-Sent Events:

- One deployment: subscribe to the hub first, then send the history strictly
  after the browser's last cursor (``Last-Event-ID``), then live events,
  dropping any the history already sent. Every message's ``id:`` is its
  cursor, so EventSource's own reconnect resumes with no gap and no repeat.
  A browser that is too far behind (more than :data:`CATCH_UP_MAX` events, or
  a cursor retention removed) is told to ``reset``: it reloads the newest page
  and pages back with "load older".
- All deployments (the list page): subscribe first, then a ``snapshot`` of the
  rows, then every new event. The browser keeps per row the newest cursor it
  has applied and ignores anything not newer, so events that arrive both in
  the snapshot and live are counted once. Each connect starts with a fresh
  snapshot, so a reconnect needs no resume position.

Timestamps travel as strings of nanoseconds: they exceed JavaScript's exact
integer range, and the page shows them exactly on hover.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from activity_events.domain.errors import FollowerLagged, OutOfRange
from activity_events.domain.events import Cursor, StoredEvent
from activity_events.domain.limits import ALL
from activity_events.http.web import SSE_KEEPALIVE, sse_frame, sse_retry
from activity_events.live.hub import Follower, Hub
from activity_events.redis.store import EventStore

logger = logging.getLogger(__name__)

CATCH_UP_MAX = 1000
"""Most missed events sent to a reconnecting browser; beyond that it reloads instead."""

MAX_HISTORY_ROUNDS = 3
"""Times a feed re-reads history when live events overflowed its queue meanwhile."""

RETRY_MS = 1000
"""How long EventSource waits before reconnecting a dropped stream."""

LIVE_BATCH = 1000
"""Most live events taken from the hub at once."""

FRAMES_BYTES = 256 * 1024
"""Most bytes of SSE frames written to a browser at once."""

SUMMARY_CHUNK = 500
"""Deployments summarised per Redis round trip."""


def event_json(event: StoredEvent) -> dict[str, Any]:
    """The page's view of one event."""
    request = event.decode()
    return {
        "cursor": str(event.cursor),
        "deployment_id": event.cursor.deployment_id,
        "id": request.id,
        "message": request.message,
        "send": str(request.timestamp.send),
        "receive": str(request.timestamp.receive),
    }


def _row(summary: Any) -> dict[str, Any]:
    last: StoredEvent | None = summary.last
    first: StoredEvent | None = summary.first
    row: dict[str, Any] = {
        "id": summary.deployment_id,
        "event_count": summary.event_count,
        "first_receive": str(first.decode().timestamp.receive) if first else None,
        "last": event_json(last) if last else None,
    }
    return row


def _recency(row: dict[str, Any]) -> tuple[int, int, int]:
    last = row["last"]
    if last is None:
        return (-1, -1, row["id"])
    cursor = Cursor.parse(last["cursor"], deployment_id=row["id"])
    return (cursor.ms, cursor.seq, row["id"])


async def deployment_rows(
    store: EventStore, limit: int, ids: Sequence[int] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The ``limit`` deployments with the newest activity, newest first, and how many exist.

    Ordering by activity needs every deployment's newest entry: one pipelined
    round trip per :data:`SUMMARY_CHUNK` deployments.
    """
    known = list(ids) if ids is not None else await store.deployment_ids()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(known), SUMMARY_CHUNK):
        for summary in await store.summaries(known[start : start + SUMMARY_CHUNK]):
            if summary.event_count or ids is not None:
                rows.append(_row(summary))
    rows.sort(key=_recency, reverse=True)
    return rows[:limit], len(rows)


def event_frame(event: StoredEvent) -> bytes:
    """The SSE frame of one event (``event: event``, its cursor as ``id``); live
    viewers share it (``LiveEvent.encoded(event_frame)``)."""
    return sse_frame(event_json(event), event="event", event_id=str(event.cursor))


async def _live(hub: Hub, sub: Follower, seen: dict[int, Cursor]) -> AsyncGenerator[bytes, None]:
    """Live events from ``sub`` newer than what ``seen`` records, per deployment.

    Live events may repeat what was sent before (the hub may append an event
    history already read, even after history ended): those batches are checked
    one by one. Once a batch of one deployment starts after everything sent,
    later batches go out as slices of the log's shared SSE frames (every viewer
    of the log sends the same bytes); all deployments' batches are always checked.
    """
    newest = max(seen.values()) if seen else None
    overlapping = True
    while not hub.stopping:
        try:
            batch = await sub.next_batch(str(newest) if newest else None, LIVE_BATCH)
        except FollowerLagged:
            logger.info("page feed fell behind; the browser reconnects and catches up")
            return
        if not batch:  # the hub's heartbeat: nothing new for a while
            if not hub.stopping:
                yield SSE_KEEPALIVE
            continue
        if overlapping and sub.deployment_id != ALL:
            overlapping = not batch.starts_after(seen)
        if not overlapping:
            last = batch.last()
            assert last is not None
            newest = last.cursor if newest is None or newest < last.cursor else newest
            seen[last.cursor.deployment_id] = last.cursor
            for message, _ in batch.messages(event_frame, FRAMES_BYTES):
                yield message
            continue
        frames = []
        for live in batch.events():
            cursor = live.cursor
            prior = seen.get(cursor.deployment_id)
            if prior is not None and cursor.key() <= prior.key():
                continue
            seen[cursor.deployment_id] = cursor
            newest = cursor if newest is None or newest < cursor else newest
            frames.append(live.encoded(event_frame))
        if frames:
            yield b"".join(frames)


async def deployment_feed(
    store: EventStore, hub: Hub, deployment_id: int, after: Cursor
) -> AsyncGenerator[bytes, None]:
    """SSE of one deployment: history strictly after ``after``, then live (module doc)."""
    sub = await hub.subscribe(deployment_id)
    try:
        yield sse_retry(RETRY_MS)
        try:
            await store.check_cursor(after)
        except OutOfRange:
            yield sse_frame({"reason": "events were removed by retention"}, event="reset")
            return
        seen = {deployment_id: after}
        sent = 0
        for _ in range(MAX_HISTORY_ROUNDS):
            async for page in store.history(deployment_id, seen[deployment_id]):
                sent += len(page)
                if sent > CATCH_UP_MAX:
                    yield sse_frame({"reason": "too many missed events"}, event="reset")
                    return
                for stored in page:
                    seen[deployment_id] = stored.cursor
                    yield event_frame(stored)
            if not sub.lagged:
                break
            sub.reset()  # live events overflowed meanwhile: read them from Redis instead
        else:
            return  # cannot keep up; the browser reconnects from its last cursor
        yield sse_frame({"cursor": str(seen[deployment_id])}, event="live")
        async for frame in _live(hub, sub, seen):
            yield frame
    finally:
        sub.close()


async def list_feed(store: EventStore, hub: Hub, limit: int) -> AsyncGenerator[bytes, None]:
    """SSE of all deployments: a snapshot of the rows, then every new event (module doc)."""
    sub = await hub.subscribe(ALL)
    try:
        yield sse_retry(RETRY_MS)
        rows, total = await snapshot(store, limit)
        yield sse_frame({"deployments": rows, "total": total}, event="snapshot")
        seen: dict[int, Cursor] = {}
        for row in rows:
            if row["last"] is not None:
                seen[row["id"]] = Cursor.parse(row["last"]["cursor"], deployment_id=row["id"])
        async for frame in _live(hub, sub, seen):
            yield frame
    finally:
        sub.close()


SNAPSHOT_SECONDS = 1.0
"""How long the list page's snapshot is shared: a thousand browsers opening the
page at once (a reconnect storm after a deploy) cost one Redis read, not a thousand."""

_snapshots: dict[
    tuple[int, int], tuple[float, asyncio.Future[tuple[list[dict[str, Any]], int]]]
] = {}


async def snapshot(store: EventStore, limit: int) -> tuple[list[dict[str, Any]], int]:
    """:func:`deployment_rows` for the list feed, shared for SNAPSHOT_SECONDS.

    The rows are only a starting point: the live events that follow are
    applied on top (newest cursor wins), so a second-old snapshot loses nothing.
    """
    loop = asyncio.get_running_loop()
    key = (id(store), limit)
    now = loop.time()
    found = _snapshots.get(key)
    if (
        found is not None
        and now - found[0] < SNAPSHOT_SECONDS
        and not (found[1].done() and (found[1].cancelled() or found[1].exception() is not None))
    ):
        return await asyncio.shield(found[1])
    future: asyncio.Future[tuple[list[dict[str, Any]], int]] = asyncio.ensure_future(
        deployment_rows(store, limit)
    )
    _snapshots[key] = (now, future)
    for stale in [k for k, (t, _) in _snapshots.items() if now - t >= SNAPSHOT_SECONDS]:
        del _snapshots[stale]
    return await asyncio.shield(future)
