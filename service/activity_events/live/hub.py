"""The follower hub: one blocking XREAD per replica, fanned out to followers.

Followers never read Redis themselves. Each replica runs one loop that
blocks on XREAD over every stream some follower watches and copies new entries
into bounded per-follower queues, so Redis connections grow with replicas, not
with followers. A follower whose queue is full is marked lagged and dropped;
it resumes from its last cursor.

Gap-free hand-over from history to live: :meth:`Hub.subscribe` starts the
hub's read position of a newly watched stream at the stream's current last
entry *before* the follower reads its history. History then covers everything
up to (at least) that entry and the hub everything after it; the follower
drops live entries it already got from history. ``$`` is never used, because
it would skip entries written between two reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as aioredis

from activity_events.domain.errors import FollowerLagged, StoreUnavailable
from activity_events.domain.events import Cursor, StoredEvent
from activity_events.redis import keys
from activity_events.redis.store import REDIS_DOWN, EventStore, _stored

logger = logging.getLogger(__name__)

ALL = 0
"""Deployment id meaning "every deployment"."""

READ_COUNT = 1000
"""Most entries per stream one XREAD returns; more arrive on the next read."""

BACKOFF_MAX = 5.0
"""Longest wait between reconnect attempts while Redis is down."""


class Subscription:
    """A follower's bounded queue of live events.

    ``lagged`` is set when the hub could not enqueue an event because the queue
    was full; from then on nothing more is queued. During its history phase a
    follower may :meth:`reset` and catch up from Redis instead; once live, a
    lagged follower is ended.
    """

    def __init__(self, hub: Hub, deployment_id: int, size: int) -> None:
        self.hub = hub
        self.deployment_id = deployment_id
        self.queue: asyncio.Queue[StoredEvent] = asyncio.Queue(size)
        self.lagged = False
        self._wake = asyncio.Event()
        self.closed = False

    def offer(self, event: StoredEvent) -> None:
        if self.lagged:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagged = True
        self._wake.set()

    def reset(self) -> None:
        """Forget queued events and the lagged mark (the follower re-reads history)."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.lagged = False

    def interrupt(self) -> None:
        """Wake a waiting follower, e.g. at shutdown or when the hub stops."""
        self._wake.set()

    async def next_batch(self, last_cursor: str | None, max_events: int) -> list[StoredEvent]:
        """Wait for queued events and return up to ``max_events`` of them.

        Raises FollowerLagged when the queue overflowed, and returns an empty
        list when woken without events (shutdown: the caller checks).
        """
        while self.queue.empty() and not self.lagged:
            self._wake.clear()
            if self.hub.stopping:
                return []
            await self._wake.wait()
        if self.lagged:
            raise FollowerLagged(last_cursor)
        batch: list[StoredEvent] = []
        while not self.queue.empty() and len(batch) < max_events:
            batch.append(self.queue.get_nowait())
        return batch

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub._remove(self)


Reply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
"""XREAD's reply: per stream key, its new entries."""


class BlockingReader:
    """One node or Sentinel: a single XREAD BLOCK over every watched stream, on
    the hub's own connection."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def read(self, streams: dict[str, bytes], count: int, block_ms: int) -> Reply:
        reply: Any = await self._redis.xread(streams, count=count, block=block_ms)  # type: ignore[arg-type]
        return list(reply or [])

    async def close(self) -> None:
        await self._redis.aclose()


class NotifiedReader:
    """Redis Cluster: XREAD cannot span slots, and a blocking read per slot would
    need a connection per slot. The append script PUBLISHes the key of each
    stream it appended to (keys.NOTIFY); this reader listens on one Pub/Sub
    connection (Cluster Pub/Sub reaches every node) and then reads just those
    streams, without blocking, through the pooled cluster client. Pub/Sub may
    drop messages (e.g. while reconnecting), so every ``block_ms`` without
    news it reads all watched streams anyway: a missed notice delays an event
    by at most that, and never loses it.
    """

    def __init__(self, client: aioredis.Redis, subscriber: Callable[[int], aioredis.Redis]) -> None:
        self._redis = client
        self._subscriber = subscriber
        self._dirty: set[str] = set()
        self._news = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    async def _listen(self) -> None:
        attempt = 0
        backoff = 0.1
        while True:
            client = self._subscriber(attempt)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(keys.NOTIFY)
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self._dirty.add(data.decode() if isinstance(data, bytes) else str(data))
                        self._news.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("hub notifications lost (%s); reconnecting", type(exc).__name__)
                self._news.set()  # read everything once, in case a notice was missed
                attempt += 1
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def read(self, streams: dict[str, bytes], count: int, block_ms: int) -> Reply:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="hub-notifications")
        if not self._dirty:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(block_ms / 1000):
                    await self._news.wait()
        self._news.clear()
        dirty, self._dirty = self._dirty, set()
        targets = [k for k in streams if k in dirty] if dirty else list(streams)
        # Streams nobody watches yet are reported empty: new deployments, for
        # followers of all deployments.
        unknown: Reply = [
            (k.encode(), []) for k in dirty if k not in streams and k.startswith(keys.PREFIX)
        ]
        if not targets:
            return unknown
        pipe = self._redis.pipeline(transaction=False)
        for key in targets:
            pipe.xread({key: streams[key]}, count=count)
        replies = await pipe.execute()
        out: Reply = []
        for reply in replies:
            for key, rows in reply or []:
                out.append((key, rows))
        return out + unknown

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._redis.aclose()


class Reader(Protocol):
    async def read(self, streams: dict[str, bytes], count: int, block_ms: int) -> Reply: ...

    async def close(self) -> None: ...


class Hub:
    """Shared live reader; see the module docstring."""

    def __init__(
        self,
        reader: Reader,
        store: EventStore,
        *,
        block_ms: int,
        queue_size: int,
        on_delivery: Callable[[StoredEvent], None] | None = None,
    ) -> None:
        self._reader = reader
        self._store = store
        self._block_ms = block_ms
        self._queue_size = queue_size
        self._on_delivery = on_delivery
        self._followers: dict[int, set[Subscription]] = {}
        self._positions: dict[int, bytes] = {}
        self._new_tail: bytes | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[Any] | None = None
        self._lock = asyncio.Lock()
        self.stopping = False

    @property
    def follower_count(self) -> int:
        return sum(len(s) for s in self._followers.values())

    @property
    def watched_streams(self) -> int:
        return len(self._positions)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="hub")

    async def stop(self) -> None:
        """End the read loop and wake every follower so its stream can end."""
        self.stopping = True
        for subs in self._followers.values():
            for sub in subs:
                sub.interrupt()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._reading is not None:
            self._reading.cancel()
        await self._reader.close()

    async def subscribe(self, deployment_id: int) -> Subscription:
        """Register a follower of one deployment (or ALL); see the module docstring."""
        if self.stopping:
            raise StoreUnavailable("server is shutting down")
        sub = Subscription(self, deployment_id, self._queue_size)
        async with self._lock:
            if deployment_id == ALL:
                if ALL not in self._followers:
                    await self._track_all()
            elif deployment_id not in self._positions:
                last = await self._store.last_entry(deployment_id)
                self._positions[deployment_id] = last.entry_id.encode()
                self._interrupt_read()
            self._followers.setdefault(deployment_id, set()).add(sub)
        self._changed.set()
        return sub

    async def _track_all(self) -> None:
        self._new_tail = await self._store.new_deployments_tail()
        ids = await self._store.deployment_ids()
        missing = [d for d in ids if d not in self._positions]
        for start in range(0, len(missing), 1000):
            chunk = missing[start : start + 1000]
            for d, cursor in (await self._store.last_entries(chunk)).items():
                self._positions[d] = cursor.entry_id.encode()
        self._interrupt_read()

    def _remove(self, sub: Subscription) -> None:
        subs = self._followers.get(sub.deployment_id)
        if subs is None:
            return
        subs.discard(sub)
        if subs:
            return
        del self._followers[sub.deployment_id]
        if sub.deployment_id == ALL:
            self._new_tail = None
            stale = [d for d in self._positions if d not in self._followers]
        else:
            stale = [] if ALL in self._followers else [sub.deployment_id]
        for d in stale:
            self._positions.pop(d, None)
        if stale:
            self._interrupt_read()

    def _interrupt_read(self) -> None:
        """Restart a blocking XREAD so it includes (or drops) streams just changed."""
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()

    async def _run(self) -> None:
        backoff = 0.1
        while not self.stopping:
            if not self._positions and self._new_tail is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams = {keys.events(d): p for d, p in self._positions.items()}
            if self._new_tail is not None:
                streams[keys.NEW_DEPLOYMENTS] = self._new_tail
            self._reading = asyncio.create_task(self._read(streams))
            try:
                reply = await self._reading
            except asyncio.CancelledError:
                if self._task is not None and self._task.cancelling():
                    raise
                continue
            except REDIS_DOWN as exc:
                logger.warning(
                    "hub read failed (%s); retrying in %.1fs", type(exc).__name__, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            except Exception:
                logger.exception("hub read failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            finally:
                self._reading = None
            backoff = 0.1
            if reply:
                await self._dispatch(reply)

    async def _read(self, streams: dict[str, bytes]) -> Reply:
        return await self._reader.read(streams, READ_COUNT, self._block_ms)

    async def _dispatch(self, reply: Reply) -> None:
        announced: list[int] = []
        delivered: list[StoredEvent] = []
        for raw_key, rows in reply:
            key = raw_key.decode()
            if not rows:
                if key.endswith(":events"):  # a stream new to this hub (Cluster notices)
                    announced.append(keys.deployment_of(key))
                continue
            if key == keys.NEW_DEPLOYMENTS:
                self._new_tail = rows[-1][0]
                announced += [int(fields[b"d"]) for _, fields in rows if b"d" in fields]
                continue
            d = keys.deployment_of(key)
            if d not in self._positions:
                continue  # no longer watched
            self._positions[d] = rows[-1][0]
            delivered += [_stored(d, entry, fields) for entry, fields in rows]
        # One ordered fan-out: by entry id, then deployment, like history_all.
        delivered.sort(key=lambda e: e.cursor.key())
        everyone = self._followers.get(ALL, set())
        for event in delivered:
            for sub in self._followers.get(event.cursor.deployment_id, ()):
                sub.offer(event)
            for sub in everyone:
                sub.offer(event)
            if self._on_delivery is not None:
                self._on_delivery(event)
        if announced and ALL in self._followers:
            for d in announced:
                # A deployment new to this hub is read from its very first entry.
                self._positions.setdefault(d, b"0-0")


def last_cursor(seen: dict[int, Cursor]) -> str | None:
    """The newest cursor a follower has been given, for resume hints."""
    if not seen:
        return None
    return str(max(seen.values()))
