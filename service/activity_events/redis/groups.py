"""Durable subscriptions: Redis Streams consumer groups, the store side.

A subscription is a consumer group named after it on every events stream it
covers: one deployment's stream, or, for "all deployments", each deployment's
stream (each its own slot on Redis Cluster, so no command ever spans two
deployments). Its settings live in the registry hash ``ae:subscriptions``.

- Groups are created eagerly for the deployments known when the subscription
  is created, and lazily (on NOGROUP) for deployments that appear later. A
  lazily created group starts at the subscription's *floor* translated to that
  stream, so "now" means the Redis clock at creation, on every deployment.
- New events: non-blocking XREADGROUP ``>`` (the caller decides when, from
  hub notifications and a bounded sweep interval); no connection is held.
- Redelivery: ``subscription_claim.lua`` takes over events idle longer than
  the visibility timeout (XPENDING IDLE + XCLAIM, which counts deliveries),
  and moves those already delivered ``max_deliveries`` times to the dead-letter
  stream ``ae:{d:N}:dlq:<name>`` instead, acknowledging them.
- Replay: ``subscription_replay.lua`` moves dead letters to a per-deployment
  replay stream ``ae:{d:N}:replay:<name>`` that the same group reads; its
  entries are deleted once acknowledged or dead-lettered again.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from redis import exceptions as rexc

from activity_events.domain.errors import InvalidArgument, NotFound, StoreUnavailable
from activity_events.domain.events import Cursor, StoredEvent
from activity_events.domain.limits import ALL
from activity_events.observability.metrics import SubscriptionMetrics
from activity_events.redis import keys
from activity_events.redis.scripts import LuaScript, run_pipelined
from activity_events.redis.store import Batch, EventStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_VISIBILITY_MS = 30_000
DEFAULT_MAX_DELIVERIES = 5
MAX_VISIBILITY_MS = 12 * 3600 * 1000
"""Longest visibility timeout accepted: half a day, beyond which a lost consumer's
events would wait unreasonably long."""
MAX_DELIVERIES_LIMIT = 1000

DEAD_LETTER_MAX_LEN = 100_000
"""Dead letters kept per subscription and deployment (approximately); the oldest
go first. Generous: dead letters are meant to be looked at and replayed."""

CHUNK = 200
"""Streams per pipelined round trip, so one round trip never carries thousands
of commands when a subscription spans many deployments."""

LAG_SCAN = 1000
"""When Redis cannot tell a group's lag (XINFO GROUPS answers nil), the entries
after its last delivered id are counted, up to this many."""

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Subscription and consumer names: they become parts of Redis keys, so no
braces (hash tags), colons or spaces."""

MAX_SEQ = 2**64 - 1


def validate_name(value: str, field: str) -> str:
    if not NAME.match(value):
        raise InvalidArgument(
            field, f"{value[:64]!r} is not a valid name (1-128 of A-Z a-z 0-9 . _ -)"
        )
    return value


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    """A subscription's settings, as stored in the registry.

    ``floor_*`` is the start position: events whose cursor orders after
    ``Cursor(floor_deployment, floor_ms, floor_seq)`` are delivered (all events
    when ``floor_ms`` is -1).
    """

    name: str
    deployment_id: int
    visibility_ms: int
    max_deliveries: int
    created_ms: int
    floor_deployment: int = 0
    floor_ms: int = -1
    floor_seq: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> SubscriptionConfig:
        return cls(**json.loads(raw))

    def group_start(self, deployment_id: int) -> str:
        """Last-delivered id a new group on ``deployment_id``'s stream starts at,
        so that it delivers exactly the events after the floor."""
        if self.floor_ms < 0:
            return "0"
        ms, seq = self.floor_ms, self.floor_seq
        if deployment_id > self.floor_deployment:
            # Entries with the floor's own id come after it: start just before.
            if seq > 0:
                return f"{ms}-{seq - 1}"
            return f"{ms - 1}-{MAX_SEQ}" if ms > 0 else "0"
        return f"{ms}-{seq}"


@dataclass(slots=True)
class Delivered:
    """An event handed to a consumer, kept as the bytes that go on the wire
    (no per-event decoding on the hot path): its cursor text, its EventRequest
    bytes, its delivery count, and where it is pending (stream key and entry
    id), for the ack."""

    cursor: bytes
    """``"<deployment>:<entry id>"`` of the event itself (for a replayed dead
    letter: of the original event, not of the replay entry)."""
    payload: bytes
    count: int
    source: str
    entry: bytes


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    lag: int
    pending: int
    dead_letters: int
    consumers: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: Cursor
    """Position in the dead-letter stream (deployment and entry id)."""
    event: StoredEvent
    deliveries: int
    consumer: str
    time_ms: int


def _is(error: object, code: str) -> bool:
    return isinstance(error, rexc.ResponseError) and str(error).startswith(code)


class ConsumerGroups:
    """A subscription's consumer groups in Redis; see the module docstring. Every public call is
    bounded by ``redis_timeout_seconds`` (StoreUnavailable past it)."""

    def __init__(self, store: EventStore, metrics: SubscriptionMetrics) -> None:
        self._store = store
        self.metrics = metrics
        self._claim = LuaScript("subscription_claim.lua")
        self._replay = LuaScript("subscription_replay.lua")

    # -- registry ----------------------------------------------------------------

    async def get(self, name: str) -> SubscriptionConfig | None:
        raw = await self._store.run(lambda r: r.hget(keys.SUBSCRIPTIONS, name))
        return None if raw is None else SubscriptionConfig.from_json(raw)

    async def all(self) -> list[SubscriptionConfig]:
        rows: Any = await self._store.run(lambda r: r.hgetall(keys.SUBSCRIPTIONS))
        configs = [SubscriptionConfig.from_json(raw) for raw in rows.values()]
        return sorted(configs, key=lambda c: c.name)

    async def open(
        self,
        name: str,
        deployment_id: int,
        *,
        start: str,
        start_cursor: Cursor | None,
        visibility_ms: int,
        max_deliveries: int,
    ) -> SubscriptionConfig:
        """The subscription ``name``, created when missing.

        ``start`` ("beginning", "now", "cursor") only matters at creation.
        Non-zero ``visibility_ms``/``max_deliveries`` update an existing one.
        """
        config = await self.get(name)
        if config is None:
            config = await self._create(
                name,
                deployment_id,
                start=start,
                start_cursor=start_cursor,
                visibility_ms=visibility_ms,
                max_deliveries=max_deliveries,
            )
        if config.deployment_id != deployment_id:
            where = (
                "all deployments"
                if config.deployment_id == ALL
                else f"deployment {config.deployment_id}"
            )
            raise InvalidArgument(
                "deployment_id", f"subscription {name!r} exists on {where}, not {deployment_id}"
            )
        changes: dict[str, int] = {}
        if visibility_ms and visibility_ms != config.visibility_ms:
            changes["visibility_ms"] = visibility_ms
        if max_deliveries and max_deliveries != config.max_deliveries:
            changes["max_deliveries"] = max_deliveries
        if changes:
            values = asdict(config) | changes
            config = SubscriptionConfig(**values)
            await self._store.run(lambda r: r.hset(keys.SUBSCRIPTIONS, name, config.to_json()))
            logger.info("subscription %s updated: %s", name, changes)
        return config

    async def _create(
        self,
        name: str,
        deployment_id: int,
        *,
        start: str,
        start_cursor: Cursor | None,
        visibility_ms: int,
        max_deliveries: int,
    ) -> SubscriptionConfig:
        reply: Any = await self._store.run(lambda r: r.time())
        if isinstance(reply, dict):  # Cluster: one answer per node asked
            reply = next(iter(reply.values()))
        seconds, micros = reply
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        floor = (0, -1, 0)
        if start == "now":
            floor = (0, now_ms, 0)
        elif start == "cursor" and start_cursor is not None:
            floor = (start_cursor.deployment_id, start_cursor.ms, start_cursor.seq)
        config = SubscriptionConfig(
            name=name,
            deployment_id=deployment_id,
            visibility_ms=visibility_ms or DEFAULT_VISIBILITY_MS,
            max_deliveries=max_deliveries or DEFAULT_MAX_DELIVERIES,
            created_ms=now_ms,
            floor_deployment=floor[0],
            floor_ms=floor[1],
            floor_seq=floor[2],
        )
        created = await self._store.run(
            lambda r: r.hsetnx(keys.SUBSCRIPTIONS, name, config.to_json())
        )
        if not created:  # another consumer created it first: theirs wins
            winner = await self.get(name)
            if winner is not None:
                return winner
        await self.ensure_groups(config, await self.deployments(config))
        logger.info("subscription %s created on deployment %d", name, deployment_id)
        return config

    async def deployments(self, config: SubscriptionConfig) -> list[int]:
        """The deployments a subscription covers now."""
        if config.deployment_id != ALL:
            return [config.deployment_id]
        return await self._store.deployment_ids()

    async def ensure_groups(
        self, config: SubscriptionConfig, deployment_ids: Sequence[int]
    ) -> None:
        """Create the subscription's group on these deployments' streams (existing ones stay)."""
        for start in range(0, len(deployment_ids), CHUNK):
            pipe = Batch()
            for d in deployment_ids[start : start + CHUNK]:
                pipe.xgroup_create(
                    keys.events(d), config.name, config.group_start(d), mkstream=True
                )
            replies = await self._store.run_batch(pipe)
            for reply in replies:
                if isinstance(reply, Exception) and not _is(reply, "BUSYGROUP"):
                    raise StoreUnavailable(f"cannot create consumer group: {reply}")

    async def replaying(self, config: SubscriptionConfig) -> list[int]:
        """Deployments whose replay stream the subscription's consumers read."""
        rows: Any = await self._store.run(lambda r: r.smembers(keys.replaying(config.name)))
        return sorted(int(r) for r in rows)

    # -- delivery ----------------------------------------------------------------

    async def read_new(
        self, config: SubscriptionConfig, consumer: str, sources: Sequence[str], count: int
    ) -> tuple[list[Delivered], set[str]]:
        """Events never delivered to the group, from these stream keys, at most
        ``count`` in total. Also answers the sources that may hold more."""
        if count <= 0 or not sources:
            return [], set(sources)
        cut = min(len(sources), count, CHUNK)
        later = set(sources[cut:])
        sources = list(sources[:cut])
        each = count // len(sources)
        pipe = Batch()
        for key in sources:
            pipe.xreadgroup(config.name, consumer, {key: ">"}, count=each)
        replies = await self._store.run_batch(pipe)
        out: list[Delivered] = []
        more: set[str] = later
        missing: list[int] = []
        for key, reply in zip(sources, replies, strict=True):
            if isinstance(reply, Exception):
                if _is(reply, "NOGROUP"):
                    # An events stream without the group yet: create it and read
                    # again. A replay stream without it was deleted: forget it.
                    if key == keys.events(keys.deployment_of(key)):
                        missing.append(keys.deployment_of(key))
                        more.add(key)
                    continue
                raise StoreUnavailable(f"redis refused XREADGROUP: {reply}")
            rows = reply[0][1] if reply else []
            if len(rows) >= each:
                more.add(key)
            d = keys.deployment_of(key)
            prefix = b"%d:" % d
            if key == keys.events(d):
                out += [
                    Delivered(prefix + entry, fields.get(keys.EVENT_FIELD, b""), 1, key, entry)
                    for entry, fields in rows
                ]
            else:  # a replay stream: the original entry id is in field "c"
                out += [
                    Delivered(
                        prefix + fields.get(b"c", entry),
                        fields.get(keys.EVENT_FIELD, b""),
                        1,
                        key,
                        entry,
                    )
                    for entry, fields in rows
                ]
        if missing:
            if await self.get(config.name) is None:
                raise NotFound(f"subscription {config.name!r} was deleted")
            await self.ensure_groups(config, missing)
        if out:
            self.metrics.delivered.labels(config.name).inc(len(out))
        return out, more

    async def claim_expired(
        self, config: SubscriptionConfig, consumer: str, sources: Sequence[str], count: int
    ) -> list[Delivered]:
        """Events of these streams whose visibility timeout expired, taken over by
        ``consumer`` (at most ``count``); those delivered ``max_deliveries`` times
        are dead-lettered instead."""
        out: list[Delivered] = []
        sources = list(sources)
        for start in range(0, len(sources), CHUNK):
            if count - len(out) <= 0:
                break
            chunk = sources[start : start + CHUNK]
            want = count - len(out)
            replies = await self._claims(config, consumer, chunk, want)
            dead = 0
            for key, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, Exception):
                    if _is(reply, "NOGROUP"):
                        continue
                    raise StoreUnavailable(f"redis refused the claim script: {reply}")
                dead += int(reply[0])
                prefix = b"%d:" % keys.deployment_of(key)
                for i in range(1, len(reply), 4):
                    entry, payload, origin, deliveries = reply[i : i + 4]
                    out.append(Delivered(prefix + origin, payload, int(deliveries), key, entry))
            if dead:
                self.metrics.dead_lettered.labels(config.name).inc(dead)
                logger.info("subscription %s: %d events dead-lettered", config.name, dead)
        if out:
            self.metrics.redeliveries.labels(config.name).inc(len(out))
            self.metrics.delivered.labels(config.name).inc(len(out))
        return out

    async def _dead_letter_page(self, key: str, start: str, count: int) -> Any:
        return await self._store.run(lambda r: r.xrange(key, start, "+", count=count))

    async def _claims(
        self, config: SubscriptionConfig, consumer: str, sources: Sequence[str], want: int
    ) -> list[Any]:
        return await self._store.run(lambda r: self._run_claims(r, config, consumer, sources, want))

    async def _run_claims(
        self,
        client: Any,
        config: SubscriptionConfig,
        consumer: str,
        sources: Sequence[str],
        want: int,
    ) -> list[Any]:
        def call(key: str) -> tuple[list[str], list[Any]]:
            d = keys.deployment_of(key)
            replay = "0" if key == keys.events(d) else "1"
            args = [config.name, consumer, config.visibility_ms, want, config.max_deliveries]
            return [key, keys.dead_letters(d, config.name)], [*args, replay, DEAD_LETTER_MAX_LEN]

        # EVALSHA through execute_command: redis-py refuses pipe.evalsha on
        # Cluster; the script touches one deployment's keys, so any shape runs it.
        lane = self._store.lanes.current()
        _, replies, _ = await run_pipelined(lane, self._claim, [call(key) for key in sources])
        return replies

    async def ack(self, config: SubscriptionConfig, delivered: Iterable[Delivered]) -> int:
        """Acknowledge delivered events (replayed ones are also deleted from
        their replay stream). Answers how many were still pending."""
        by_source: dict[str, list[bytes]] = {}
        for item in delivered:
            by_source.setdefault(item.source, []).append(item.entry)
        if not by_source:
            return 0
        pipe = Batch()
        for source, entries in by_source.items():
            pipe.xack(source, config.name, *entries)
            if source != keys.events(keys.deployment_of(source)):
                pipe.xdel(source, *entries)
        replies = await self._store.run_batch(pipe)
        acked = 0
        reply_iter = iter(replies)
        for source in by_source:
            reply = next(reply_iter)
            if source != keys.events(keys.deployment_of(source)):
                next(reply_iter)
            if isinstance(reply, Exception):
                if _is(reply, "NOGROUP"):
                    continue
                raise StoreUnavailable(f"redis refused XACK: {reply}")
            acked += int(reply)
        if acked:
            self.metrics.acknowledged.labels(config.name).inc(acked)
        return acked

    # -- management --------------------------------------------------------------

    async def stats(self, config: SubscriptionConfig) -> SubscriptionStats:
        """Lag, pending, dead letters and consumers summed over the subscription's
        streams: two pipelined round trips per CHUNK deployments."""
        deployments = await self.deployments(config)
        replaying = set(await self.replaying(config))
        tally = _Tally(config)
        for start in range(0, len(deployments), CHUNK):
            chunk = deployments[start : start + CHUNK]
            pipe = Batch()
            for d in chunk:
                pipe.xinfo_groups(keys.events(d))
                pipe.xlen(keys.dead_letters(d, config.name))
                if d in replaying:
                    pipe.xinfo_groups(keys.replays(d, config.name))
                    pipe.xlen(keys.replays(d, config.name))
            replies = iter(await self._store.run_batch(pipe))
            for d in chunk:
                tally.add_stream(keys.events(d), next(replies), next(replies))
                if d in replaying:
                    tally.add_replay(next(replies), next(replies))
            await tally.follow_up(self._store)
        return tally.stats()

    async def delete(self, name: str) -> int:
        """Remove a subscription, its groups, replay streams and dead letters.
        Answers the number of dead letters removed. NotFound when unknown."""
        config = await self.get(name)
        if config is None:
            raise NotFound(f"subscription {name!r} does not exist")
        removed = await self._store.run(lambda r: r.hdel(keys.SUBSCRIPTIONS, name))
        if not removed:
            raise NotFound(f"subscription {name!r} does not exist")
        deployments = sorted(
            set(await self.deployments(config)) | set(await self.replaying(config))
        )
        dead = 0
        for start in range(0, len(deployments), CHUNK):
            chunk = deployments[start : start + CHUNK]
            pipe = Batch()
            for d in chunk:
                pipe.xlen(keys.dead_letters(d, name))
                pipe.xgroup_destroy(keys.events(d), name)
                pipe.delete(keys.dead_letters(d, name), keys.replays(d, name))
            replies = await self._store.run_batch(pipe)
            dead += sum(_int(r) for r in replies[0::3])
        await self._store.run(lambda r: r.delete(keys.replaying(name)))
        self.metrics.forget(name)
        logger.info("subscription %s deleted with %d dead letters", name, dead)
        return dead

    async def dead_letters(
        self, config: SubscriptionConfig, deployment_id: int, after: Cursor | None, count: int
    ) -> tuple[list[DeadLetter], Cursor | None]:
        """A page of dead letters by deployment, then dead-letter order, strictly
        after ``after``; and the position to continue from (None at the end)."""
        if deployment_id != ALL:
            deployments = [deployment_id]
        else:
            deployments = sorted(
                set(await self.deployments(config)) | set(await self.replaying(config))
            )
        if after is not None:
            deployments = [d for d in deployments if d >= after.deployment_id]
        out: list[DeadLetter] = []
        for d in deployments:
            start = "-"
            if after is not None and d == after.deployment_id:
                start = "(" + after.entry_id
            rows = await self._dead_letter_page(
                keys.dead_letters(d, config.name), start, count - len(out) + 1
            )
            for entry, fields in rows:
                if len(out) == count:
                    return out, out[-1].id
                dead_id = Cursor.from_entry(d, entry)
                origin = fields.get(b"c", b"0-0")
                out.append(
                    DeadLetter(
                        id=dead_id,
                        event=StoredEvent(Cursor.from_entry(d, origin), fields.get(b"e", b"")),
                        deliveries=_int(fields.get(b"n")),
                        consumer=fields.get(b"o", b"").decode(errors="replace"),
                        time_ms=dead_id.ms,
                    )
                )
        return out, None

    async def replay(
        self, config: SubscriptionConfig, ids: Sequence[Cursor], deployment_id: int
    ) -> int:
        """Queue dead letters for delivery again: the given ones, or all (of
        ``deployment_id`` unless ALL). Answers how many were moved."""
        moved = 0
        touched: set[int] = set()
        if ids:
            by_deployment: dict[int, list[str]] = {}
            for cursor in ids:
                by_deployment.setdefault(cursor.deployment_id, []).append(cursor.entry_id)
            for d, entries in by_deployment.items():
                n = await self._replay_one(config, d, ["ids", 0, *entries])
                moved += n
                if n:
                    touched.add(d)
        else:
            if deployment_id != ALL:
                deployments = [deployment_id]
            else:
                deployments = await self.deployments(config)
            for d in deployments:
                for _ in range(DEAD_LETTER_MAX_LEN // 500 + 2):
                    n = await self._replay_one(config, d, ["all", 500])
                    moved += n
                    if n:
                        touched.add(d)
                    if n < 500:
                        break
        if touched:
            await self._store.run(
                lambda r: r.sadd(keys.replaying(config.name), *[str(d) for d in touched])
            )
        logger.info("subscription %s: %d dead letters replayed", config.name, moved)
        return moved

    async def _replay_one(self, config: SubscriptionConfig, d: int, args: list[Any]) -> int:
        keys_ = [keys.dead_letters(d, config.name), keys.replays(d, config.name)]
        return int(await self._store.run(lambda r: self._replay(r, keys_, [config.name, *args])))


class _Tally:
    """:meth:`Subscriptions.stats`' sums. What one round trip cannot tell ("lag"
    when Redis does not know it, consumer names) is asked in a second one: each
    follow-up command is queued with the function that folds its answer in."""

    def __init__(self, config: SubscriptionConfig) -> None:
        self.config = config
        self.lag = self.pending = self.dead = 0
        self.consumers: set[bytes] = set()
        self._follow = Batch()
        self._folds: list[Callable[[Any], None]] = []

    def add_stream(self, key: str, groups: Any, dead_letters: Any) -> None:
        """One deployment's stream: its XINFO GROUPS and dead-letter XLEN replies."""
        self.dead += _int(dead_letters)
        group = _group(groups, self.config.name)
        if group is None:
            if self.config.deployment_id == ALL:
                # A deployment the subscription has not touched yet: all of it.
                self._follow.xlen(key)
                self._folds.append(self._add_length)
            return
        self.pending += int(group["pending"])
        if group.get("lag") is not None:
            self.lag += int(group["lag"])
        else:  # Redis cannot tell: count what follows the group's position
            last = group["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else str(last)
            self._follow.xrange(key, "(" + last, "+", count=LAG_SCAN)
            self._folds.append(self._add_count)
        if int(group["consumers"]):
            self._follow.xinfo_consumers(key, self.config.name)
            self._folds.append(self._add_consumers)

    def add_replay(self, groups: Any, length: Any) -> None:
        """A replay stream: what is in it and not pending is lag."""
        group = _group(groups, self.config.name)
        if group is not None:
            pending = int(group["pending"])
            self.pending += pending
            self.lag += max(0, _int(length) - pending)

    async def follow_up(self, store: EventStore) -> None:
        """Send the queued follow-ups (if any) and fold their answers in."""
        if not self._folds:
            return
        folds, self._folds = self._folds, []
        answers = await store.run_batch(self._follow)
        self._follow = Batch()
        for fold, answer in zip(folds, answers, strict=True):
            if not isinstance(answer, Exception):
                fold(answer)

    def _add_count(self, rows: Any) -> None:
        self.lag += len(rows)

    def _add_length(self, length: Any) -> None:
        self.lag += _int(length)

    def _add_consumers(self, rows: Any) -> None:
        self.consumers |= {_name(row["name"]) for row in rows}

    def stats(self) -> SubscriptionStats:
        return SubscriptionStats(self.lag, self.pending, self.dead, len(self.consumers))


def _int(value: Any) -> int:
    if value is None or isinstance(value, Exception):
        return 0
    return int(value)


def _name(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _group(groups: Any, name: str) -> dict[str, Any] | None:
    if isinstance(groups, Exception) or not groups:
        return None
    wanted = name.encode()
    for group in groups:
        raw = group["name"]
        if raw in (wanted, name):
            return dict(group)
    return None
