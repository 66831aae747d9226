"""EventStore: the Redis Streams data layer.

Everything that knows Redis commands lives here; callers see domain types
(`NewEvent`, `StoredEvent`, `Cursor`) and domain errors. Each public call is
bounded by ``redis_timeout_seconds``: a Redis that does not answer in time is
reported as :class:`StoreUnavailable`, never as a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import heapq
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc

from activity_events.app.settings import Settings
from activity_events.domain.errors import (
    ActivityError,
    Corrupt,
    NotFound,
    NotReplicated,
    OutOfRange,
    StoreUnavailable,
)
from activity_events.domain.events import Cursor, NewEvent, StoredEvent, receive_timestamp_field
from activity_events.redis import keys

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCRIPT_CHUNK = 200
"""Most events one append script call handles, so no single call blocks Redis for long."""

APPEND_ROUNDS = 8
"""Most times an append call is re-sent because concurrent writers assigned ids
in a dedup bucket it did not name (see _script_call)."""

NEED_BUCKET = 4
"""append.lua's answer for an event whose dedup bucket was not among its KEYS."""

DELETE_RACED = -2
"""delete.lua's answer when the bucket set changed since the caller read it."""

COALESCE_MAX = 512
"""Most concurrent unary creates sent to Redis in one round trip."""

PIPELINE_CHUNK = 500
"""Commands per pipeline when one is sent for each of many deployments."""

MERGE_PAGE_FLOOR = 16
"""Smallest per-deployment page when merging many deployments into one ordered stream."""

MERGE_BUDGET = 20_000
"""Events buffered at most across all deployments while merging them."""

REDIS_DOWN = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.ReadOnlyError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    OSError,
    TimeoutError,
)
"""Redis failures that mean "not reachable right now": the call is retryable."""


def _load(name: str) -> str:
    scripts = resources.files(__package__).joinpath("scripts")
    return scripts.joinpath("lib.lua").read_text() + "\n" + scripts.joinpath(name).read_text()


class LuaScript:
    """A Lua script run by SHA, loaded again transparently after NOSCRIPT
    (Redis restart, failover, SCRIPT FLUSH)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = _load(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(
        self, client: aioredis.Redis, keys_: Sequence[str], args: Sequence[Any]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys_), *keys_, *args)
        except rexc.NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys_), *keys_, *args)


class Outcome(enum.Enum):
    CREATED = "created"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    EXHAUSTED = "exhausted"


_CODES = {0: Outcome.CREATED, 1: Outcome.DUPLICATE, 2: Outcome.CONFLICT, 3: Outcome.EXHAUSTED}


@dataclass(slots=True)
class AppendResult:
    outcome: Outcome
    event_id: int
    deployment_id: int
    entry: bytes
    """Stream entry id of the stored event (for conflicts: of the event holding
    the id); empty when there is none. Kept as Redis returned it: a bulk call
    only needs the cursor's text, and parsing one per event costs."""

    @property
    def cursor(self) -> Cursor | None:
        return Cursor.from_entry(self.deployment_id, self.entry) if self.entry else None

    @property
    def cursor_bytes(self) -> bytes:
        """The cursor's text form (``<deployment>:<ms>-<seq>``), or b""."""
        return b"%d:%s" % (self.deployment_id, self.entry) if self.entry else b""


@dataclass(frozen=True, slots=True)
class DeploymentSummary:
    deployment_id: int
    event_count: int
    first: StoredEvent | None
    last: StoredEvent | None


class EventStore:
    """Append, read, list and delete events; see the module docstring."""

    def __init__(
        self, client: aioredis.Redis, settings: Settings, *, cluster: bool = False
    ) -> None:
        self._redis = client
        self._settings = settings
        self.cluster = cluster
        self._notify = keys.NOTIFY if cluster else ""
        # Bounds Redis work in flight to the pool size in every shape (Sentinel
        # and Cluster pools refuse rather than wait), so callers queue here,
        # within their timeout, instead of failing or opening connections.
        self._slots = asyncio.Semaphore(settings.redis_max_connections)
        # WAIT is per node; on Cluster the pipeline spans nodes, so it is not offered there.
        self._wait_replicas = 0 if cluster else settings.redis_wait_replicas
        self._timeout = settings.redis_timeout_seconds
        self._append = LuaScript("append.lua")
        self._delete = LuaScript("delete.lua")
        # Replay reads XRANGE through a second client on the same pool whose
        # reply is left as hiredis parsed it (nested lists of bytes): redis-py's
        # usual conversion to a tuple and a dict per entry costs more than all
        # the rest of the server's work per replayed event. (On Cluster the
        # usual client is used; its replies are normalised to the same shape.)
        self._raw: aioredis.Redis | None = None
        if not cluster:
            self._raw = aioredis.Redis(connection_pool=client.connection_pool)
            self._raw.set_response_callback("XRANGE", _unparsed)
        self._pending: list[tuple[NewEvent, int, asyncio.Future[AppendResult]]] = []
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()
        self._abandoned: set[asyncio.Future[Any]] = set()
        """Redis work given up on at its timeout, still unwinding (see bounded)."""
        self._max_ids: dict[int, int] = {}
        """Largest event id seen per deployment: where id-0 assignment is expected next."""
        self._indexed: set[int] = set()
        """Deployments this process has put into the index (saves a ZADD per create)."""
        self.on_failure: Callable[[], None] | None = None
        """Called when Redis was unreachable, so health can react before its next probe."""

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def bounded(self, work: Awaitable[T]) -> T:
        """Run Redis work within the command timeout, mapping failures to
        StoreUnavailable.

        The work runs in a task of its own and the caller waits at most the
        timeout for it. Cancelling a redis-py call makes it tear its
        connection down, and against a Redis that is alive but not answering
        (paused, partitioned) that teardown can itself hang; the caller must
        not wait for it. An abandoned task finishes in the background and
        keeps its concurrency slot until then, so a stuck Redis cannot be
        flooded with new connections either.
        """
        task = asyncio.ensure_future(self._in_slot(work))
        try:
            done, _ = await asyncio.wait({task}, timeout=self._timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            self._abandoned.add(task)
            task.add_done_callback(self._forget)
            if self.on_failure is not None:
                self.on_failure()
            raise StoreUnavailable(f"redis did not answer within {self._timeout:g}s")
        try:
            return task.result()
        except rexc.AuthenticationError:  # a ConnectionError: must come first
            if self.on_failure is not None:
                self.on_failure()
            raise StoreUnavailable(
                "redis rejected the credentials (check the password or ACL user)"
            ) from None
        except rexc.ResponseError as exc:
            if "NOPERM" in str(exc) or "NOAUTH" in str(exc):
                if self.on_failure is not None:
                    self.on_failure()
                raise StoreUnavailable(f"redis refused the credentials: {str(exc)[:120]}") from None
            # OOM, MISCONF, READONLY and friends: the store cannot take the call now.
            text = str(exc).split("\n", 1)[0][:200]
            if self.on_failure is not None:
                self.on_failure()
            raise StoreUnavailable(f"redis refused the command: {text}") from None
        except REDIS_DOWN as exc:
            if self.on_failure is not None:
                self.on_failure()
            raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from None

    async def _in_slot(self, work: Awaitable[T]) -> T:
        started = False
        try:
            async with self._slots:
                started = True
                return await work
        finally:
            if not started and isinstance(work, Coroutine):
                work.close()  # never awaited: cancelled while waiting for a slot

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not report it as lost

    async def ping(self) -> None:
        await self.bounded(self._redis.ping())

    # -- writes ----------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent], receive_ns: int) -> list[AppendResult]:
        """Store events (deduplicated), one result per event in input order.

        Events of one deployment go through the append script together, in
        order; all deployments of the batch share one pipelined round trip.
        """
        return await self.bounded(self._append_all([(e, receive_ns) for e in events]))

    async def append_one(self, event: NewEvent, receive_ns: int) -> AppendResult:
        """Store one event, coalesced with the other events appended during the
        same event-loop turn into one pipelined round trip (and one script call
        per deployment). Concurrent unary creates thereby cost Redis and Python
        about what one batch does; a lone create is sent right away."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AppendResult] = loop.create_future()
        self._pending.append((event, receive_ns, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        while self._pending:
            batch, self._pending = self._pending[:COALESCE_MAX], self._pending[COALESCE_MAX:]
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[NewEvent, int, asyncio.Future[AppendResult]]]) -> None:
        live = [(event, receive) for event, receive, future in batch if not future.done()]
        futures = [future for *_, future in batch if not future.done()]
        if not live:
            return
        try:
            results = await self.bounded(self._append_all(live))
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

    async def _append_all(self, items: Sequence[tuple[NewEvent, int]]) -> list[AppendResult]:
        groups: dict[int, list[int]] = {}
        for index, (event, _) in enumerate(items):
            groups.setdefault(event.deployment_id, []).append(index)
        # Each event's script arguments, built once even if its call is re-sent.
        prepared: list[tuple[int, bytes, bytes]] = []
        encoded: tuple[int, bytes] = (-1, b"")  # the receive time is usually shared
        for event, receive_ns in items:
            if encoded[0] != receive_ns:
                encoded = (receive_ns, receive_timestamp_field(receive_ns))
            payload = event.payload_without_id(receive_ns, encoded[1])
            prepared.append((event.event_id, event.digest(), payload))

        calls: list[tuple[int, list[int]]] = [
            (deployment_id, indexes[start : start + SCRIPT_CHUNK])
            for deployment_id, indexes in groups.items()
            for start in range(0, len(indexes), SCRIPT_CHUNK)
        ]
        results: list[AppendResult | None] = [None] * len(items)
        fresh: set[int] = set()
        for _ in range(APPEND_ROUNDS):
            expect = dict(self._max_ids)  # advanced by each call's id-0 events, in order
            replies = await self._run_appends(
                [self._script_call(d, idx, prepared, expect) for d, idx in calls]
            )
            again: list[tuple[int, list[int]]] = []
            for (deployment_id, indexes), reply in zip(calls, replies, strict=True):
                if reply[-1] == 1:
                    fresh.add(deployment_id)
                for n in range((len(reply) - 1) // 3):
                    code, event_id, entry = reply[3 * n : 3 * n + 3]
                    if int(code) == NEED_BUCKET:
                        # The guess was off (another writer moved the ids on, or
                        # the deployment was deleted and began again): send this
                        # event and the rest again from the id the script needs.
                        self._max_ids[deployment_id] = int(event_id) - 1
                        again.append((deployment_id, indexes[n:]))
                        break
                    if event_id:
                        self._note_id(deployment_id, int(event_id))
                    results[indexes[n]] = AppendResult(
                        _CODES[int(code)], int(event_id) if event_id else 0, deployment_id, entry
                    )
            if not again:
                break
            calls = again
        else:
            raise StoreUnavailable("concurrent writers kept assigning ids; retry")
        self._indexed.update(groups)
        if fresh:
            await self._announce(sorted(fresh))
        return [r for r in results if r is not None]

    def _note_id(self, deployment_id: int, event_id: int) -> None:
        if event_id > self._max_ids.get(deployment_id, 0):
            self._max_ids[deployment_id] = event_id

    def _script_call(
        self,
        deployment_id: int,
        indexes: list[int],
        prepared: list[tuple[int, bytes, bytes]],
        expect: dict[int, int],
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one append.lua call. Besides the explicit ids' dedup
        buckets it passes those the ids it expects to assign for id 0 fall into
        (from the largest id this process has seen in the deployment); a wrong
        guess is answered with NEED_BUCKET and costs one more round trip."""
        events = [prepared[i] for i in indexes]
        wanted = {keys.bucket_of(event_id) for event_id, _, _ in events if event_id}
        assign = sum(1 for event_id, _, _ in events if not event_id)
        if assign:
            first = expect.get(deployment_id, 0) + 1
            expect[deployment_id] = first + assign - 1
            wanted.update(range(keys.bucket_of(first), keys.bucket_of(first + assign - 1) + 1))
        buckets = sorted(wanted)
        args: list[Any] = [
            *self._retention_args(),
            self._notify,
            len(buckets),
            *buckets,
            len(events),
        ]
        for event in events:
            args += event
        return keys.deployment_keys(deployment_id) + [
            keys.ids(deployment_id, b) for b in buckets
        ], args

    def _retention_args(self) -> list[int]:
        max_age = self._settings.retention_max_age_seconds
        min_ms = int((time.time() - max_age) * 1000) if max_age > 0 else 0
        return [self._settings.retention_max_len, min_ms]

    async def _run_appends(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """EVALSHA every call in one pipeline (index ZADDs first), reloading the
        script and re-running only the calls that met NOSCRIPT."""
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            # Index deployments this process has not written yet. Fresh ones
            # (first event, or first after a delete) are indexed again by
            # _announce, so a stale entry here never loses a deployment.
            deployments = {keys.deployment_of(calls[i][0][0]) for i in pending}
            unindexed = deployments - self._indexed
            if unindexed:
                pipe.zadd(keys.DEPLOYMENTS, {str(d): d for d in unindexed})
            for i in pending:
                keys_, args = calls[i]
                pipe.execute_command("EVALSHA", self._append.sha, len(keys_), *keys_, *args)
            if self._wait_replicas:
                # Same connection as the writes: WAIT counts replicas that have them.
                pipe.execute_command(
                    "WAIT", self._wait_replicas, self._settings.redis_wait_timeout_ms
                )
            out = await pipe.execute(raise_on_error=False)
            if unindexed:
                out = out[1:]
            if self._wait_replicas:
                acked, out = out[-1], out[:-1]
                if isinstance(acked, Exception):
                    raise acked
                if int(acked) < self._wait_replicas:
                    raise NotReplicated(
                        f"only {acked} of {self._wait_replicas} replicas acknowledged the write "
                        f"within {self._settings.redis_wait_timeout_ms} ms; "
                        "retry (it is deduplicated)"
                    )
            missing = []
            for i, reply in zip(pending, out, strict=True):
                if isinstance(reply, rexc.NoScriptError):
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    replies[i] = reply
            if not missing:
                return replies
            if attempt == 0:
                await self._redis.script_load(self._append.source)
            pending = missing
        raise rexc.ResponseError("append script could not be loaded")

    async def _announce(self, deployment_ids: list[int]) -> None:
        """Index deployments that just got their first event (again after a
        delete) and tell hubs following "all deployments" about them."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(keys.DEPLOYMENTS, {str(d): d for d in deployment_ids})
        for d in deployment_ids:
            pipe.xadd(keys.NEW_DEPLOYMENTS, {b"d": str(d)}, maxlen=1000, approximate=True)
        await pipe.execute()

    async def delete(self, deployment_id: int) -> int:
        """Remove a deployment; the number of events removed. NotFound if unknown."""

        async def work() -> int:
            self._indexed.discard(deployment_id)
            self._max_ids.pop(deployment_id, None)
            await self._redis.zrem(keys.DEPLOYMENTS, str(deployment_id))
            for _ in range(APPEND_ROUNDS):
                # delete.lua must name every dedup bucket: read the set, and try
                # again if a concurrent create added a bucket in between.
                members: Any = await self._redis.smembers(keys.buckets(deployment_id))
                buckets = [keys.ids(deployment_id, int(b)) for b in members]
                removed = int(
                    await self._delete(
                        self._redis, keys.deployment_keys(deployment_id) + buckets, []
                    )
                )
                if removed != DELETE_RACED:
                    return removed
            raise StoreUnavailable("concurrent creates kept adding to the deployment; retry")

        removed = await self.bounded(work())
        if removed < 0:
            raise NotFound(f"deployment {deployment_id} does not exist")
        return removed

    # -- reads -----------------------------------------------------------------

    async def read_before(
        self, deployment_id: int, before: Cursor | None, count: int
    ) -> list[StoredEvent]:
        """Up to ``count`` events of one deployment strictly before ``before``
        (the newest if None), newest first: the page a person reads backwards."""
        newest = "+" if before is None else "(" + before.entry_id
        rows: Any = await self.bounded(
            self._redis.xrevrange(keys.events(deployment_id), newest, "-", count=count)
        )
        return [_stored(deployment_id, entry, fields) for entry, fields in rows]

    async def read_page(
        self, deployment_id: int, after: Cursor | None, count: int, *, inclusive: bool = False
    ) -> list[StoredEvent]:
        """Up to ``count`` events of one deployment after ``after`` (from the start if None)."""
        start = "-" if after is None else after.entry_id if inclusive else "(" + after.entry_id
        rows: Any = await self.bounded(
            self._redis.xrange(keys.events(deployment_id), start, "+", count=count)
        )
        return [_stored(deployment_id, entry, fields) for entry, fields in rows]

    @property
    def clients(self) -> list[aioredis.Redis]:
        """Every client object the store sends commands through (for instrumentation)."""
        return [self._redis] if self._raw is None else [self._redis, self._raw]

    async def read_flat(self, deployment_id: int, start: str, count: int) -> tuple[bool, list[Any]]:
        """Up to ``count`` entries of one deployment from ``start`` ("-" or
        "(<entry id>") as ``[[entry id, [field, value, ...]], ...]``, and whether
        more may follow (the page is full)."""
        key = keys.events(deployment_id)
        if self._raw is not None:
            rows: Any = await self.bounded(
                self._raw.execute_command("XRANGE", key, start, "+", "COUNT", count)  # type: ignore[no-untyped-call]
            )
        else:
            parsed: Any = await self.bounded(self._redis.xrange(key, start, "+", count=count))
            rows = [
                [entry, [f for pair in fields.items() for f in pair]] for entry, fields in parsed
            ]
        return len(rows) == count, rows

    async def history_flat(
        self, deployment_id: int, after: Cursor | None, limit: int | None
    ) -> AsyncIterator[list[Any]]:
        """One deployment's history after ``after`` (at most ``limit`` events) in
        pages of raw entries (see :meth:`read_flat`), oldest first. The next page
        is read from Redis while the caller sends this one."""
        page = self._settings.page_size

        def read(start: str, remaining: int | None) -> asyncio.Future[tuple[bool, list[Any]]]:
            count = page if remaining is None else min(page, remaining)
            return asyncio.ensure_future(self.read_flat(deployment_id, start, count))

        pending = read("-" if after is None else "(" + after.entry_id, limit)
        try:
            while True:
                more, rows = await pending
                if not rows:
                    return
                if limit is not None:
                    limit -= len(rows)
                    more = more and limit > 0
                if more:
                    pending = read("(" + rows[-1][0].decode(), limit)
                yield rows
                if not more:
                    return
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, ActivityError):
                    await pending

    async def check_cursor(self, cursor: Cursor) -> None:
        """OutOfRange when events after ``cursor`` were removed by retention."""
        trimmed = await self.bounded(self._redis.hget(keys.meta(cursor.deployment_id), "trimmed"))
        if trimmed is not None:
            last_gone = Cursor.from_entry(cursor.deployment_id, trimmed)
            if (cursor.ms, cursor.seq) < (last_gone.ms, last_gone.seq):
                raise OutOfRange(
                    f"after: events after cursor {cursor} were removed by retention; "
                    f"the oldest retained history starts after {last_gone}"
                )

    async def check_cursor_all(self, cursor: Cursor) -> None:
        """OutOfRange when any deployment lost events newer than ``cursor`` to retention."""
        ids = await self.deployment_ids()
        for start in range(0, len(ids), PIPELINE_CHUNK):
            chunk = ids[start : start + PIPELINE_CHUNK]
            pipe = self._redis.pipeline(transaction=False)
            for d in chunk:
                pipe.hget(keys.meta(d), "trimmed")
            trimmed = await self.bounded(pipe.execute())
            for d, entry in zip(chunk, trimmed, strict=True):
                if entry is None:
                    continue
                gone = Cursor.from_entry(d, entry)
                if (cursor.ms, cursor.seq) < (gone.ms, gone.seq):
                    raise OutOfRange(
                        f"after: deployment {d} removed events after cursor {cursor} by retention"
                    )

    async def history(
        self, deployment_id: int, after: Cursor | None
    ) -> AsyncIterator[list[StoredEvent]]:
        """Pages of one deployment's history, oldest first, to the end of the stream."""
        page = self._settings.page_size
        while True:
            rows = await self.read_page(deployment_id, after, page)
            if rows:
                yield rows
                after = rows[-1].cursor
            if len(rows) < page:
                return

    async def history_all(self, after: Cursor | None) -> AsyncIterator[list[StoredEvent]]:
        """Pages of every deployment's history merged in arrival order: by entry
        id, ties by deployment id. Resuming from a cursor continues strictly
        after it in that order. Memory stays bounded by MERGE_BUDGET events."""
        ids = await self.deployment_ids()
        if not ids:
            return
        per = max(MERGE_PAGE_FLOOR, min(self._settings.page_size, MERGE_BUDGET // len(ids)))
        out_page = self._settings.page_size

        def start(d: int) -> str:
            if after is None:
                return "-"
            # Same entry id: deployments ordered after the cursor's come after it.
            return after.entry_id if d > after.deployment_id else "(" + after.entry_id

        buffers: dict[int, list[StoredEvent]] = {}
        positions: dict[int, int] = {}
        heap: list[tuple[tuple[int, int, int], int]] = []
        for first in range(0, len(ids), PIPELINE_CHUNK):  # first pages: one round trip per chunk
            chunk = ids[first : first + PIPELINE_CHUNK]
            pipe = self._redis.pipeline(transaction=False)
            for d in chunk:
                pipe.xrange(keys.events(d), start(d), "+", count=per)
            replies: Any = await self.bounded(pipe.execute())
            for d, raw in zip(chunk, replies, strict=True):
                rows = [_stored(d, entry, fields) for entry, fields in raw]
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
                rows = await self.read_page(d, rows[-1].cursor, per) if len(rows) == per else []
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

    async def last_entry(self, deployment_id: int) -> Cursor:
        """Cursor of the newest event of a deployment (entry 0-0 when it has none)."""
        rows: Any = await self.bounded(
            self._redis.xrevrange(keys.events(deployment_id), "+", "-", count=1)
        )
        if not rows:
            return Cursor(deployment_id, 0, 0)
        return Cursor.from_entry(deployment_id, rows[0][0])

    async def last_entries(self, deployment_ids: Sequence[int]) -> dict[int, Cursor]:
        """:meth:`last_entry` for many deployments in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for d in deployment_ids:
            pipe.xrevrange(keys.events(d), "+", "-", count=1)
        replies = await self.bounded(pipe.execute())
        return {
            d: Cursor.from_entry(d, rows[0][0]) if rows else Cursor(d, 0, 0)
            for d, rows in zip(deployment_ids, replies, strict=True)
        }

    async def deployment_ids(self, start_after: int = 0, count: int | None = None) -> list[int]:
        """Known deployment ids in ascending order, after ``start_after``."""
        rows: Any = await self.bounded(
            self._redis.zrangebyscore(
                keys.DEPLOYMENTS,
                f"({start_after}",
                "+inf",
                start=0 if count is not None else None,
                num=count,
            )
        )
        return [int(r) for r in rows]

    async def summaries(self, deployment_ids: Sequence[int]) -> list[DeploymentSummary]:
        pipe = self._redis.pipeline(transaction=False)
        for d in deployment_ids:
            key = keys.events(d)
            pipe.xlen(key)
            pipe.xrange(key, "-", "+", count=1)
            pipe.xrevrange(key, "+", "-", count=1)
        replies = await self.bounded(pipe.execute())
        out = []
        for n, d in enumerate(deployment_ids):
            count, first, last = replies[3 * n : 3 * n + 3]
            out.append(
                DeploymentSummary(
                    deployment_id=d,
                    event_count=int(count),
                    first=_stored(d, *first[0]) if first else None,
                    last=_stored(d, *last[0]) if last else None,
                )
            )
        return out

    async def new_deployments_tail(self) -> bytes:
        """Entry id of the newest "new deployment" announcement ("0-0" if none)."""
        rows: Any = await self.bounded(
            self._redis.xrevrange(keys.NEW_DEPLOYMENTS, "+", "-", count=1)
        )
        return bytes(rows[0][0]) if rows else b"0-0"


def _unparsed(response: Any, **options: Any) -> Any:
    return response


def _stored(deployment_id: int, entry: bytes, fields: dict[bytes, bytes]) -> StoredEvent:
    payload = fields.get(keys.EVENT_FIELD)
    if payload is None:
        raise Corrupt(f"deployment {deployment_id}: stream entry {entry!r} has no event field")
    return StoredEvent(Cursor.from_entry(deployment_id, entry), payload)
