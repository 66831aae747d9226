"""EventStore: the Redis Streams data layer.

Everything that knows Redis commands about events lives here; callers see
domain types (`NewEvent`, `StoredEvent`, `Cursor`) and domain errors. Every
command runs on the current call's lane (:mod:`activity_events.redis.lanes`):
a busy lane is refused with RESOURCE_EXHAUSTED, a Redis that does not answer
within ``redis_timeout_seconds`` is reported as :class:`StoreUnavailable`,
never as a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis

from activity_events.codec.wire import Row
from activity_events.domain.errors import (
    ActivityError,
    Corrupt,
    NotFound,
    NotReplicated,
    OutOfRange,
    StoreUnavailable,
)
from activity_events.domain.events import Cursor, NewEvent, StoredEvent, receive_timestamp_field
from activity_events.redis import keys, scripts
from activity_events.redis.commit import GroupCommit
from activity_events.redis.lanes import Lane, Lanes, Work
from activity_events.redis.scripts import LuaScript, run_pipelined

if TYPE_CHECKING:
    from activity_events.app.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCRIPT_CHUNK = 200
"""Most events one append script call handles, so no single call blocks Redis for long."""

APPEND_ROUNDS = 8
"""Most times an append call is re-sent because concurrent writers assigned ids
in a dedup bucket it did not name (see _script_call)."""


KEYS_REMEMBERED = 10_000
"""Deployments whose key names the write path keeps (forgotten all at once past this)."""

PIPELINE_CHUNK = 500
"""Commands per pipeline when one is sent for each of many deployments."""

ENTRY_OVERHEAD_BYTES = 260
"""Memory of one stream entry as hiredis returns it, besides its payload: the
entry id and field name as bytes objects and two small lists. History pages are
sized by ``stream_buffer_bytes`` / (payload + this), so a reader's buffers stay
within its budget whatever the events' size."""

MIN_PAGE = 16
"""Fewest entries a history page asks for, however large the events."""


class Outcome(enum.Enum):
    CREATED = "created"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    EXHAUSTED = "exhausted"


_CODES = {
    scripts.CREATED: Outcome.CREATED,
    scripts.DUPLICATE: Outcome.DUPLICATE,
    scripts.CONFLICT: Outcome.CONFLICT,
    scripts.NO_FREE_ID: Outcome.EXHAUSTED,
}


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

    def __init__(self, lanes: Lanes, settings: Settings, *, cluster: bool = False) -> None:
        self.lanes = lanes
        self._settings = settings
        self.cluster = cluster
        self._notify = keys.NOTIFY if cluster else ""
        # WAIT is per node; on Cluster the pipeline spans nodes, so it is not offered there.
        self._wait_replicas = 0 if cluster else settings.redis_wait_replicas
        self._append = LuaScript("append.lua")
        self._delete = LuaScript("delete.lua")
        self._commit: GroupCommit[tuple[NewEvent, int], AppendResult] = GroupCommit(
            self._append_items
        )
        self._max_ids: dict[int, int] = {}
        """Largest event id seen per deployment: where id-0 assignment is expected next."""
        self._indexed: set[int] = set()
        """Deployments this process has put into the index (saves a ZADD per create)."""
        self._deployment_keys: dict[int, list[str]] = {}

    async def run(self, work: Work[T], *, raw: bool = False) -> T:
        """Run Redis work on the current call's lane (see :mod:`activity_events.redis.lanes`)."""
        return await self.lanes.current().run(work, raw=raw)

    async def run_batch(self, batch: Batch) -> list[Any]:
        """Send a :class:`Batch` in one round trip; failed commands come back as
        exception objects in their place (the caller judges them)."""

        def work(client: aioredis.Redis) -> Any:
            pipe = client.pipeline(transaction=False)
            for name, args, kwargs in batch.calls:
                getattr(pipe, name)(*args, **kwargs)
            return pipe.execute(raise_on_error=False)

        return list(await self.run(work))

    # -- writes ----------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent], receive_ns: int) -> list[AppendResult]:
        """Store events (deduplicated), one result per event in input order.

        Events of one deployment go through the append script together, in
        order; all deployments of the batch share one pipelined round trip.
        """
        items = [(e, receive_ns) for e in events]
        lane = self.lanes.writes
        return await lane.run_sends(lambda: self._append_all(lane, items))

    async def append_one(self, event: NewEvent, receive_ns: int) -> AppendResult:
        """Store one event, sent together with other concurrent creates in one
        pipelined round trip (and one script call per deployment): see
        :class:`~activity_events.redis.commit.GroupCommit`."""
        return await self._commit.submit((event, receive_ns))

    async def _append_items(self, items: list[tuple[NewEvent, int]]) -> list[AppendResult]:
        lane = self.lanes.writes
        return await lane.run_sends(lambda: self._append_all(lane, items))

    async def _append_all(
        self, lane: Lane, items: Sequence[tuple[NewEvent, int]]
    ) -> list[AppendResult]:
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
        retention = self._retention_args()
        for _ in range(APPEND_ROUNDS):
            expect = dict(self._max_ids)  # advanced by each call's id-0 events, in order
            replies = await self._run_appends(
                lane,
                [self._script_call(d, idx, prepared, expect, retention) for d, idx in calls],
                {d for d, _ in calls},
            )
            again: list[tuple[int, list[int]]] = []
            for (deployment_id, indexes), reply in zip(calls, replies, strict=True):
                if reply[-1] == 1:
                    fresh.add(deployment_id)
                for n in range((len(reply) - 1) // 3):
                    code, event_id, entry = reply[3 * n : 3 * n + 3]
                    if int(code) == scripts.NEED_BUCKET:
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
            await self._announce(lane, sorted(fresh))
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
        retention: list[int],
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
            *retention,
            self._notify,
            len(buckets),
            *buckets,
            len(events),
        ]
        for event in events:
            args += event
        return self._keys_of(deployment_id) + [keys.ids(deployment_id, b) for b in buckets], args

    def _keys_of(self, deployment_id: int) -> list[str]:
        """:func:`keys.deployment_keys`, remembered for the deployments written lately."""
        found = self._deployment_keys.get(deployment_id)
        if found is None:
            if len(self._deployment_keys) >= KEYS_REMEMBERED:
                self._deployment_keys.clear()
            found = self._deployment_keys[deployment_id] = keys.deployment_keys(deployment_id)
        return found

    def _retention_args(self) -> list[int]:
        max_age = self._settings.retention_max_age_seconds
        min_ms = int((time.time() - max_age) * 1000) if max_age > 0 else 0
        return [self._settings.retention_max_len, min_ms]

    async def _run_appends(
        self, lane: Lane, calls: list[tuple[list[str], list[Any]]], deployments: set[int]
    ) -> list[Any]:
        """Every append call in one pipeline: the index ZADD of deployments this
        process has not written yet first, the optional WAIT last (on the same
        connection as the writes, so it counts replicas that have them)."""
        # Fresh deployments (first event, or first after a delete) are indexed
        # again by _announce, so a stale entry in _indexed never loses one.
        unindexed = deployments - self._indexed
        before = []
        if unindexed:
            members = [part for d in unindexed for part in (d, str(d))]
            before.append(("ZADD", keys.DEPLOYMENTS, *members))
        after = []
        if self._wait_replicas:
            after.append(("WAIT", self._wait_replicas, self._settings.redis_wait_timeout_ms))
        _, replies, tail = await run_pipelined(
            lane, self._append, calls, before=before, after=after
        )
        if tail:
            acked = tail[0]
            if isinstance(acked, Exception):
                raise acked
            if int(acked) < self._wait_replicas:
                raise NotReplicated(
                    f"only {acked} of {self._wait_replicas} replicas acknowledged the write "
                    f"within {self._settings.redis_wait_timeout_ms} ms; "
                    "retry (it is deduplicated)"
                )
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _announce(self, lane: Lane, deployment_ids: list[int]) -> None:
        """Index deployments that just got their first event (again after a
        delete) and tell hubs following "all deployments" about them."""
        commands: list[Sequence[Any]] = [
            ("ZADD", keys.DEPLOYMENTS, *(part for d in deployment_ids for part in (d, str(d))))
        ]
        for d in deployment_ids:
            commands.append(("XADD", keys.NEW_DEPLOYMENTS, "MAXLEN", "~", 1000, "*", b"d", str(d)))
        for reply in await lane.send(commands):
            if isinstance(reply, Exception):
                raise reply

    async def delete(self, deployment_id: int) -> int:
        """Remove a deployment; the number of events removed. NotFound if unknown."""

        async def work(client: aioredis.Redis) -> int:
            self._indexed.discard(deployment_id)
            self._max_ids.pop(deployment_id, None)
            await client.zrem(keys.DEPLOYMENTS, str(deployment_id))
            for _ in range(APPEND_ROUNDS):
                # delete.lua must name every dedup bucket: read the set, and try
                # again if a concurrent create added a bucket in between.
                members: Any = await client.smembers(keys.buckets(deployment_id))
                buckets = [keys.ids(deployment_id, int(b)) for b in members]
                removed = int(
                    await self._delete(client, keys.deployment_keys(deployment_id) + buckets, [])
                )
                if removed != scripts.DELETE_RACED:
                    return removed
            raise StoreUnavailable("concurrent creates kept adding to the deployment; retry")

        removed = await self.run(work)
        if removed == scripts.DELETE_UNKNOWN:
            raise NotFound(f"deployment {deployment_id} does not exist")
        return removed

    # -- reads -----------------------------------------------------------------

    async def read_before(
        self, deployment_id: int, before: Cursor | None, count: int
    ) -> list[StoredEvent]:
        """Up to ``count`` events of one deployment strictly before ``before``
        (the newest if None), newest first: the page a person reads backwards."""
        newest = "+" if before is None else "(" + before.entry_id
        key = keys.events(deployment_id)
        rows: Any = await self.run(lambda r: r.xrevrange(key, newest, "-", count=count))
        return [_stored(deployment_id, entry, fields) for entry, fields in rows]

    async def read_page(
        self, deployment_id: int, after: Cursor | None, count: int, *, inclusive: bool = False
    ) -> list[StoredEvent]:
        """Up to ``count`` events of one deployment after ``after`` (from the start if None)."""
        start = "-" if after is None else after.entry_id if inclusive else "(" + after.entry_id
        key = keys.events(deployment_id)
        rows: Any = await self.run(lambda r: r.xrange(key, start, "+", count=count))
        return [_stored(deployment_id, entry, fields) for entry, fields in rows]

    async def read_rows(self, deployment_id: int, start: str, count: int) -> tuple[bool, list[Row]]:
        """Up to ``count`` events of one deployment from ``start`` ("-" or
        "(<entry id>") as ``(entry id, EventRequest bytes)`` pairs, and whether
        more may follow (the page is full). The reply is taken as hiredis parsed
        it: redis-py's conversion to a tuple and a dict per entry costs more than
        all the rest of the server's work per replayed event."""
        key = keys.events(deployment_id)
        if not self.cluster:
            raw: Any = await self.run(
                lambda r: r.execute_command("XRANGE", key, start, "+", "COUNT", count),  # type: ignore[no-untyped-call]
                raw=True,
            )
            rows = [
                (
                    entry,
                    fields[1]
                    if fields[0] == keys.EVENT_FIELD
                    else _payload(deployment_id, entry, fields),
                )
                for entry, fields in raw
            ]
        else:  # the Cluster client normalises replies itself
            parsed: Any = await self.run(lambda r: r.xrange(key, start, "+", count=count))
            rows = [
                (entry, _stored(deployment_id, entry, fields).payload) for entry, fields in parsed
            ]
        return len(rows) == count, rows

    def page_count(self, budget_bytes: int, entry_bytes: float | None = None) -> int:
        """Entries per history page so that a page stays within ``budget_bytes``
        in memory (``entry_bytes``: the payload size seen so far, or a guess)."""
        per_entry = ENTRY_OVERHEAD_BYTES + (entry_bytes if entry_bytes is not None else 128)
        return min(self._settings.page_size, max(MIN_PAGE, int(budget_bytes // per_entry)))

    async def history_rows(
        self, deployment_id: int, after: Cursor | None, limit: int | None, budget_bytes: int
    ) -> AsyncIterator[list[Row]]:
        """One deployment's history after ``after`` (at most ``limit`` events) in
        pages of rows (see :meth:`read_rows`), oldest first.

        The next page is read from Redis while the caller sends this one, so a
        reader holds two pages; each is sized to half of ``budget_bytes`` from
        the sizes of the events read so far.
        """
        page_budget = budget_bytes // 2
        entry_bytes: float | None = None

        def read(start: str, remaining: int | None) -> asyncio.Future[tuple[bool, list[Row]]]:
            count = self.page_count(page_budget, entry_bytes)
            if remaining is not None:
                count = min(count, remaining)
            return asyncio.ensure_future(self.read_rows(deployment_id, start, count))

        pending = read("-" if after is None else "(" + after.entry_id, limit)
        try:
            while True:
                more, rows = await pending
                if not rows:
                    return
                sample = rows[:: max(1, len(rows) // 16)]
                entry_bytes = sum(len(payload) for _, payload in sample) / len(sample)
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
        meta = keys.meta(cursor.deployment_id)
        trimmed = await self.run(lambda r: r.hget(meta, "trimmed"))
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

            def work(client: aioredis.Redis, chunk: list[int] = chunk) -> Any:
                pipe = client.pipeline(transaction=False)
                for d in chunk:
                    pipe.hget(keys.meta(d), "trimmed")
                return pipe.execute()

            trimmed = await self.run(work)
            for d, entry in zip(chunk, trimmed, strict=True):
                if entry is None:
                    continue
                gone = Cursor.from_entry(d, entry)
                if (cursor.ms, cursor.seq) < (gone.ms, gone.seq):
                    raise OutOfRange(
                        f"after: deployment {d} removed events after cursor {cursor} by retention"
                    )

    async def history(
        self, deployment_id: int, after: Cursor | None, count: int | None = None
    ) -> AsyncIterator[list[StoredEvent]]:
        """Pages of one deployment's history, oldest first, to the end of the stream."""
        page = count or self._settings.page_size
        while True:
            rows = await self.read_page(deployment_id, after, page)
            if rows:
                yield rows
                after = rows[-1].cursor
            if len(rows) < page:
                return

    async def first_pages(
        self, deployment_ids: Sequence[int], starts: Sequence[str], count: int
    ) -> list[list[StoredEvent]]:
        """The first ``count`` events of each deployment from its ``start``
        ("-" or "(<entry id>" or an inclusive id), one round trip per chunk."""
        out: list[list[StoredEvent]] = []
        for first in range(0, len(deployment_ids), PIPELINE_CHUNK):
            chunk = list(zip(deployment_ids, starts, strict=True))[first : first + PIPELINE_CHUNK]

            def work(client: aioredis.Redis, chunk: list[tuple[int, str]] = chunk) -> Any:
                pipe = client.pipeline(transaction=False)
                for d, start in chunk:
                    pipe.xrange(keys.events(d), start, "+", count=count)
                return pipe.execute()

            replies: Any = await self.run(work)
            for (d, _), raw in zip(chunk, replies, strict=True):
                out.append([_stored(d, entry, fields) for entry, fields in raw])
        return out

    async def last_entry(self, deployment_id: int) -> Cursor:
        """Cursor of the newest event of a deployment (entry 0-0 when it has none)."""
        key = keys.events(deployment_id)
        rows: Any = await self.run(lambda r: r.xrevrange(key, "+", "-", count=1))
        if not rows:
            return Cursor(deployment_id, 0, 0)
        return Cursor.from_entry(deployment_id, rows[0][0])

    async def last_entries(self, deployment_ids: Sequence[int]) -> dict[int, Cursor]:
        """:meth:`last_entry` for many deployments in one round trip."""

        def work(client: aioredis.Redis) -> Any:
            pipe = client.pipeline(transaction=False)
            for d in deployment_ids:
                pipe.xrevrange(keys.events(d), "+", "-", count=1)
            return pipe.execute()

        replies = await self.run(work)
        return {
            d: Cursor.from_entry(d, rows[0][0]) if rows else Cursor(d, 0, 0)
            for d, rows in zip(deployment_ids, replies, strict=True)
        }

    async def deployment_ids(self, start_after: int = 0, count: int | None = None) -> list[int]:
        """Known deployment ids in ascending order, after ``start_after``."""
        rows: Any = await self.run(
            lambda r: r.zrangebyscore(
                keys.DEPLOYMENTS,
                f"({start_after}",
                "+inf",
                start=0 if count is not None else None,
                num=count,
            )
        )
        return [int(r) for r in rows]

    async def summaries(self, deployment_ids: Sequence[int]) -> list[DeploymentSummary]:
        def work(client: aioredis.Redis) -> Any:
            pipe = client.pipeline(transaction=False)
            for d in deployment_ids:
                key = keys.events(d)
                pipe.xlen(key)
                pipe.xrange(key, "-", "+", count=1)
                pipe.xrevrange(key, "+", "-", count=1)
            return pipe.execute()

        replies = await self.run(work)
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
        rows: Any = await self.run(lambda r: r.xrevrange(keys.NEW_DEPLOYMENTS, "+", "-", count=1))
        return bytes(rows[0][0]) if rows else b"0-0"


def unparsed(response: Any, **options: Any) -> Any:
    """Response callback that keeps hiredis' reply as it is (lanes' raw clients)."""
    return response


def _payload(deployment_id: int, entry: bytes, fields: Sequence[bytes]) -> bytes:
    """The event bytes among a raw entry's [field, value, ...] (Corrupt without them)."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == keys.EVENT_FIELD:
            return fields[i + 1]
    raise Corrupt(f"deployment {deployment_id}: stream entry {entry!r} has no event field")


def _stored(deployment_id: int, entry: bytes, fields: dict[bytes, bytes]) -> StoredEvent:
    payload = fields.get(keys.EVENT_FIELD)
    if payload is None:
        raise Corrupt(f"deployment {deployment_id}: stream entry {entry!r} has no event field")
    return StoredEvent(Cursor.from_entry(deployment_id, entry), payload)


def stored(deployment_id: int, entry: bytes, fields: dict[bytes, bytes]) -> StoredEvent:
    """A StoredEvent from a parsed stream entry (Corrupt without its event field)."""
    return _stored(deployment_id, entry, fields)


class Batch:
    """Commands recorded now and sent later in one pipelined round trip on the
    lane of the call (:meth:`EventStore.run_batch`); any redis-py command method
    records itself, e.g. ``batch.xlen(key)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return record

    def __len__(self) -> int:
        return len(self.calls)
