"""The follower hub: one blocking XREAD per replica, fanned out to followers.

Followers never read Redis themselves. Each replica runs one loop that
blocks on XREAD over every stream some follower watches and appends new
entries to a **shared log** per followed deployment (and one for followers of
all deployments), so Redis connections grow with replicas, not with
followers, and an event costs the same whether one follower or thousands
watch it:

- a follower is a position in its log, not a queue: taking its next batch is
  a slice, and every encoding of an event (the WatchEvents piece, the page's
  Server-Sent Events frame) is made once and shared (:meth:`LiveEvent.encoded`);
- a log keeps the newest ``follower_queue`` events and at most
  ``live_log_bytes``; a follower whose position fell off its start has lagged
  and is ended with RESOURCE_EXHAUSTED and its last cursor (during its history
  phase it re-reads from Redis instead);
- waking followers costs CPU per follower, so the hub wakes them at most
  ``live_wakeups_per_second`` times a second in all: with many followers it
  waits a little between reads and hands each follower a bigger batch.
  Latency grows with the number of followers; writers keep their share.

Gap-free hand-over from history to live: :meth:`Hub.subscribe` starts the
hub's read position of a newly watched stream at the stream's current last
entry *before* the follower reads its history. History then covers everything
up to (at least) that entry and the hub everything after it; the follower
drops live entries it already got from history. ``$`` is never used, because
it would skip entries written between two reads.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis

from activity_events.domain.errors import FollowerLagged, StoreUnavailable
from activity_events.domain.events import Cursor, StoredEvent
from activity_events.domain.limits import ALL
from activity_events.redis import keys
from activity_events.redis.lanes import REDIS_DOWN
from activity_events.redis.store import EventStore, stored

logger = logging.getLogger(__name__)

READ_COUNT = 1000
"""Most entries per stream one XREAD returns; more arrive on the next read."""

RECONNECT_BACKOFF_MAX = 5.0
"""Longest wait between reconnect attempts while Redis is down."""

HEARTBEAT_SECONDS = 15.0
"""Every this often the hub wakes idle followers with an empty batch (see next_batch):
one timer for all of them instead of one per follower and wait."""

MAX_PAUSE_SECONDS = 1.0
"""Longest pause between two reads that the wake-up budget imposes."""

EVENT_OVERHEAD_BYTES = 200
"""Memory of a live event besides its payload (objects, cursor, log slot)."""


@dataclass(slots=True)
class LiveEvent(StoredEvent):
    """A stored event as the hub delivers it, with its encodings made once."""

    cache: dict[Any, bytes] | None = field(default=None, repr=False, compare=False)

    def encoded(self, codec: Codec) -> bytes:
        """``codec(self)``, computed once for all followers that need it."""
        cache = self.cache
        if cache is None:
            cache = self.cache = {}
        found = cache.get(codec)
        if found is None:
            found = cache[codec] = codec(self)
        return found


Codec = Callable[[StoredEvent], bytes]
"""An encoding of one event for the wire: a WatchEvents piece, an SSE frame."""


class Chunk:
    """The events one read of the hub appended to a log, and their encodings
    joined: a follower that takes whole chunks costs one slice of bytes per
    chunk, whatever the number of events or of followers."""

    __slots__ = ("_joined", "events", "position")

    def __init__(self, position: int, events: list[LiveEvent]) -> None:
        self.position = position
        """Log position of ``events[0]``."""
        self.events = events
        self._joined: dict[Any, tuple[bytes, list[int]]] = {}

    def joined(self, codec: Codec) -> tuple[bytes, list[int]]:
        """All events encoded and concatenated, and the offset where each starts
        (plus the end), so any run of them is one slice."""
        found = self._joined.get(codec)
        if found is None:
            pieces = [event.encoded(codec) for event in self.events]
            offsets = [0, *itertools.accumulate(len(piece) for piece in pieces)]
            found = self._joined[codec] = (b"".join(pieces), offsets)
        return found


class Batch:
    """What a follower takes from its log at once: runs of consecutive chunks."""

    __slots__ = ("count", "runs")

    def __init__(self, runs: list[tuple[Chunk, int, int]]) -> None:
        self.runs = runs
        """``(chunk, start, stop)``: the chunk's events ``start:stop``."""
        self.count = sum(stop - start for _, start, stop in runs)

    def __len__(self) -> int:
        return self.count

    def events(self) -> list[LiveEvent]:
        """The events one by one (for the paths that must look at each)."""
        return [event for chunk, a, b in self.runs for event in chunk.events[a:b]]

    def messages(self, codec: Codec, max_bytes: int) -> list[tuple[bytes, LiveEvent]]:
        """The events' encodings concatenated into messages of at most about
        ``max_bytes`` (cut between events), each with its last event, built from
        slices of the chunks' joined bytes: a few slices per message, not one
        piece per event."""
        out: list[tuple[bytes, LiveEvent]] = []
        parts: list[bytes] = []
        size = 0
        last: LiveEvent | None = None
        for chunk, first, stop in self.runs:
            data, offsets = chunk.joined(codec)
            start = first
            while start < stop:
                room = max_bytes - size
                end = stop
                if offsets[stop] - offsets[start] > room:
                    # as many events as fit (at least one in an empty message)
                    end = bisect.bisect_right(offsets, offsets[start] + room, start, stop + 1) - 1
                    if end <= start:
                        if parts and last is not None:
                            out.append((b"".join(parts), last))
                            parts, size = [], 0
                            continue
                        end = start + 1
                whole = start == 0 and end == len(chunk.events)
                piece = data if whole else data[offsets[start] : offsets[end]]
                parts.append(piece)
                size += len(piece)
                last = chunk.events[end - 1]
                start = end
        if parts and last is not None:
            out.append((b"".join(parts), last))
        return out

    def last(self) -> LiveEvent | None:
        if not self.runs:
            return None
        chunk, _, stop = self.runs[-1]
        return chunk.events[stop - 1]

    def starts_after(self, sent: dict[int, Cursor]) -> bool:
        """Whether the batch's first event is newer than the newest of its
        deployment in ``sent``. For a follower of one deployment every later
        batch then is too (its events reach the log in order); the log of all
        deployments interleaves streams, so there it says nothing of the rest."""
        if not self.runs:
            return False
        chunk, start, _ = self.runs[0]
        cursor = chunk.events[start].cursor
        prior = sent.get(cursor.deployment_id)
        return prior is None or prior.key() < cursor.key()

    def run_lasts(self) -> list[LiveEvent]:
        """The last event of each run (each the newest of its chunk's part)."""
        return [chunk.events[stop - 1] for chunk, _, stop in self.runs]


class Log:
    """The recent live events of one deployment (or of all), shared by its followers."""

    __slots__ = ("base", "chunks", "end", "followers", "size", "waiters")

    def __init__(self) -> None:
        self.chunks: collections.deque[Chunk] = collections.deque()
        self.base = 0
        """Position of the oldest event kept: positions grow by one per event, forever."""
        self.end = 0
        """Position the next event will have."""
        self.size = 0
        """Bytes the events hold (payloads plus EVENT_OVERHEAD_BYTES each)."""
        self.followers: set[Follower] = set()
        self.waiters: list[asyncio.Future[None]] = []

    def append(self, batch: list[LiveEvent], max_events: int, max_bytes: int) -> None:
        self.chunks.append(Chunk(self.end, batch))
        self.end += len(batch)
        self.size += sum(len(e.payload) for e in batch) + EVENT_OVERHEAD_BYTES * len(batch)
        # Whole chunks go from the front while the log is over either bound
        # (the newest chunk always stays).
        while len(self.chunks) > 1 and (self.end - self.base > max_events or self.size > max_bytes):
            oldest = self.chunks.popleft()
            self.base += len(oldest.events)
            self.size -= sum(len(e.payload) for e in oldest.events)
            self.size -= EVENT_OVERHEAD_BYTES * len(oldest.events)

    def take(self, position: int, max_events: int) -> Batch:
        """Up to ``max_events`` events from ``position`` (>= base) on."""
        runs: list[tuple[Chunk, int, int]] = []
        wanted = max_events
        for chunk in self.chunks:
            size = len(chunk.events)
            if chunk.position + size <= position:
                continue
            start = max(0, position - chunk.position)
            stop = min(size, start + wanted)
            runs.append((chunk, start, stop))
            wanted -= stop - start
            if wanted <= 0:
                break
        return Batch(runs)

    def wake(self) -> int:
        """Wake every waiting follower; how many there were."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return len(waiters)


class Follower:
    """One follower of a deployment (or ALL): a position in the hub's shared log.

    ``lagged`` when its position fell off the log's start. During its history
    phase a follower may :meth:`reset` (skip to the end of the log) and catch
    up from Redis instead; once live, a lagged follower is ended.
    """

    __slots__ = ("closed", "deployment_id", "hub", "log", "position")

    def __init__(self, hub: Hub, deployment_id: int, log: Log) -> None:
        self.hub = hub
        self.deployment_id = deployment_id
        self.log = log
        self.position = log.end
        self.closed = False

    @property
    def lagged(self) -> bool:
        return self.position < self.log.base

    @property
    def behind(self) -> int:
        """Events in the log this follower has not taken yet."""
        return self.log.end - self.position

    def reset(self) -> None:
        """Forget the backlog and the lagged mark (the follower re-reads history)."""
        self.position = self.log.end

    async def next_batch(self, last_cursor: str | None, max_events: int) -> Batch:
        """Wait for events and take up to ``max_events`` of them.

        Raises FollowerLagged when the follower fell off the log. The batch is
        empty when woken without events: at shutdown (the caller checks
        ``hub.stopping``), or by the hub's heartbeat every HEARTBEAT_SECONDS,
        which lets a stream with nothing to send send a keep-alive.
        """
        log = self.log
        if self.position >= log.end:
            if self.hub.stopping or self.closed:
                return EMPTY
            waiter = self.hub.loop.create_future()
            log.waiters.append(waiter)
            await waiter
            if self.position >= log.end:
                return EMPTY
        if self.position < log.base:
            raise FollowerLagged(last_cursor)
        batch = log.take(self.position, max_events)
        self.position += batch.count
        return batch

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub._remove(self)


EMPTY = Batch([])


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
                backoff = min(RECONNECT_BACKOFF_MAX, backoff * 2)
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
        log_events: int,
        log_bytes: int,
        wakeups_per_second: float,
        on_delivery: Callable[[StoredEvent], None] | None = None,
    ) -> None:
        self._reader = reader
        self._store = store
        self._block_ms = block_ms
        self._log_events = log_events
        self._log_bytes = log_bytes
        self._wakeups = wakeups_per_second
        self._on_delivery = on_delivery
        self._logs: dict[int, Log] = {}
        self._positions: dict[int, bytes] = {}
        self._new_tail: bytes | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[Any] | None = None
        self._lock = asyncio.Lock()
        self._heartbeat: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        """The loop the hub runs on (set again at start), kept so followers need not
        look it up (every lookup costs a system call on Python 3.11)."""
        self.stopping = False

    @property
    def follower_count(self) -> int:
        return sum(len(log.followers) for log in self._logs.values())

    @property
    def watched_streams(self) -> int:
        return len(self._positions)

    @property
    def buffered_bytes(self) -> int:
        """Bytes the shared logs hold now."""
        return sum(log.size for log in self._logs.values())

    def start(self) -> None:
        if self._task is None:
            self.loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._run(), name="hub")
            self._heartbeat = self.loop.call_later(HEARTBEAT_SECONDS, self._beat)

    def _beat(self) -> None:
        """Wake every waiting follower with an empty batch (see next_batch)."""
        for log in self._logs.values():
            log.wake()
        if not self.stopping:
            self._heartbeat = self.loop.call_later(HEARTBEAT_SECONDS, self._beat)

    async def stop(self) -> None:
        """End the read loop and wake every follower so its stream can end."""
        self.stopping = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for log in self._logs.values():
            log.wake()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._reading is not None:
            self._reading.cancel()
        await self._reader.close()

    async def subscribe(self, deployment_id: int) -> Follower:
        """Register a follower of one deployment (or ALL); see the module docstring."""
        if self.stopping:
            raise StoreUnavailable("server is shutting down")
        async with self._lock:
            if deployment_id == ALL:
                if ALL not in self._logs:
                    await self._track_all()
            elif deployment_id not in self._positions:
                last = await self._store.last_entry(deployment_id)
                self._positions[deployment_id] = last.entry_id.encode()
                self._interrupt_read()
            log = self._logs.get(deployment_id)
            if log is None:
                log = self._logs[deployment_id] = Log()
            follower = Follower(self, deployment_id, log)
            log.followers.add(follower)
        self._changed.set()
        return follower

    async def _track_all(self) -> None:
        self._new_tail = await self._store.new_deployments_tail()
        ids = await self._store.deployment_ids()
        missing = [d for d in ids if d not in self._positions]
        for start in range(0, len(missing), 1000):
            chunk = missing[start : start + 1000]
            for d, cursor in (await self._store.last_entries(chunk)).items():
                self._positions[d] = cursor.entry_id.encode()
        self._interrupt_read()

    def _remove(self, follower: Follower) -> None:
        log = self._logs.get(follower.deployment_id)
        if log is None or follower not in log.followers:
            return
        log.followers.discard(follower)
        if log.followers:
            return
        del self._logs[follower.deployment_id]
        if follower.deployment_id == ALL:
            self._new_tail = None
            stale = [d for d in self._positions if d not in self._logs]
        else:
            stale = [] if ALL in self._logs else [follower.deployment_id]
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
                backoff = min(RECONNECT_BACKOFF_MAX, backoff * 2)
                continue
            except Exception:
                logger.exception("hub read failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(RECONNECT_BACKOFF_MAX, backoff * 2)
                continue
            finally:
                self._reading = None
            backoff = 0.1
            if reply:
                woken = self._dispatch(reply)
                if woken and self._wakeups > 0:
                    # The wake-up budget: the next batch waits in Redis meanwhile.
                    await asyncio.sleep(min(MAX_PAUSE_SECONDS, woken / self._wakeups))

    async def _read(self, streams: dict[str, bytes]) -> Reply:
        return await self._reader.read(streams, READ_COUNT, self._block_ms)

    def _dispatch(self, reply: Reply) -> int:
        """Append what a read returned to the logs; how many followers were woken."""
        announced: list[int] = []
        delivered: list[LiveEvent] = []
        for raw_key, rows in reply:
            key = raw_key.decode()
            if not rows:
                if key.endswith(":events"):  # a stream new to this hub (Cluster notices)
                    announced.append(keys.deployment_of(key))
            elif key == keys.NEW_DEPLOYMENTS:
                self._new_tail = rows[-1][0]
                announced += [int(fields[b"d"]) for _, fields in rows if b"d" in fields]
            else:
                delivered += self._entries(keys.deployment_of(key), rows)
        if announced and ALL in self._logs:
            for d in announced:
                # A deployment new to this hub is read from its very first entry.
                self._positions.setdefault(d, b"0-0")
        return self._fan_out(delivered) if delivered else 0

    def _entries(self, d: int, rows: list[tuple[bytes, dict[bytes, bytes]]]) -> list[LiveEvent]:
        """A watched stream's new entries (none once it is no longer watched)."""
        if d not in self._positions:
            return []
        self._positions[d] = rows[-1][0]
        out = []
        for entry, fields in rows:
            event = stored(d, entry, fields)
            out.append(LiveEvent(event.cursor, event.payload))
        return out

    def _fan_out(self, delivered: list[LiveEvent]) -> int:
        """One ordered fan-out (by entry id, then deployment, like history_all) to
        each deployment's log and the all-deployments log; followers woken."""
        delivered.sort(key=lambda e: e.cursor.key())
        by_deployment: dict[int, list[LiveEvent]] = {}
        for event in delivered:
            by_deployment.setdefault(event.cursor.deployment_id, []).append(event)
            if self._on_delivery is not None:
                self._on_delivery(event)
        woken = 0
        for d, events in by_deployment.items():
            log = self._logs.get(d)
            if log is not None:
                log.append(events, self._log_events, self._log_bytes)
                woken += log.wake()
        everyone = self._logs.get(ALL)
        if everyone is not None:
            everyone.append(delivered, self._log_events, self._log_bytes)
            woken += everyone.wake()
        return woken


def last_cursor(seen: dict[int, Cursor]) -> str | None:
    """The newest cursor a follower has been given, for resume hints."""
    if not seen:
        return None
    return str(max(seen.values()))
