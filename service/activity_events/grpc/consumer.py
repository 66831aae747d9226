"""One consumer of a durable subscription: flow control, acks and deliveries.

One :class:`Consumer` serves one ``Subscribe`` call. It holds no Redis
connection of its own: every read is a non-blocking XREADGROUP on the
streams lane, so a replica's Redis connections do not grow with its
consumers. What tells a consumer *when* to read:

- the follower hub (one blocking XREAD per replica, already running for
  WatchEvents): the consumer registers as a follower of its deployment (or of
  all) and treats every event the hub sees as a hint "this stream has news";
- acknowledgements (they free in-flight slots);
- a sweep every ``SWEEP_SECONDS`` over all of its streams, which covers hints
  lost while the hub reconnects, and a claim pass for expired visibility
  timeouts at a quarter of the timeout (at most every ``SWEEP_SECONDS``).

Latency is therefore the hub's (milliseconds), and the cost of an idle
consumer is one pipelined round trip per sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from activity_events.codec.wire import delivery_responses
from activity_events.domain.errors import FollowerLagged, InvalidArgument, NotFound
from activity_events.domain.events import Cursor, validate_deployment_id
from activity_events.domain.limits import ALL, MAX_RESPONSE_BYTES
from activity_events.live.hub import Follower, Hub
from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis import keys
from activity_events.redis.groups import (
    MAX_DELIVERIES_LIMIT,
    MAX_VISIBILITY_MS,
    ConsumerGroups,
    Delivered,
    SubscriptionConfig,
    validate_name,
)

DEFAULT_IN_FLIGHT = 100
MAX_IN_FLIGHT = 10_000
MIN_VISIBILITY_MS = 10
SWEEP_SECONDS = 1.0
"""Longest time between two reads of every stream of a subscription (see module docstring)."""
CONFIG_REFRESH_SECONDS = 2.0
"""How often a consumer re-reads its subscription's settings (and notices a delete)."""

_STARTS = {
    pb.START_POSITION_UNSPECIFIED: "beginning",
    pb.START_POSITION_BEGINNING: "beginning",
    pb.START_POSITION_NOW: "now",
    pb.START_POSITION_CURSOR: "cursor",
}


@dataclass(frozen=True, slots=True)
class OpenRequest:
    subscription: str
    consumer: str
    deployment_id: int
    start: str
    start_cursor: Cursor | None
    visibility_ms: int
    max_deliveries: int
    max_in_flight: int


def validate_open(message: pb.SubscribeOpen) -> OpenRequest:
    """Check the first message of a Subscribe call; InvalidArgument names the bad field."""
    subscription = validate_name(message.subscription, "subscription")
    consumer = message.consumer or f"consumer-{secrets.token_hex(6)}"
    validate_name(consumer, "consumer")
    deployment = validate_deployment_id(message.deployment_id, allow_all=True)
    start = _STARTS.get(message.start)
    if start is None:
        raise InvalidArgument("start", f"unknown start position {message.start}")
    cursor = None
    if start == "cursor":
        if not message.start_cursor:
            raise InvalidArgument("start_cursor", "is required with START_POSITION_CURSOR")
        cursor = Cursor.parse(message.start_cursor, deployment_id=deployment, field="start_cursor")
    elif message.start_cursor:
        raise InvalidArgument("start_cursor", "is only allowed with START_POSITION_CURSOR")
    visibility = message.visibility_timeout_ms
    if visibility != 0 and not MIN_VISIBILITY_MS <= visibility <= MAX_VISIBILITY_MS:
        raise InvalidArgument(
            "visibility_timeout_ms",
            f"must be 0 (keep) or between {MIN_VISIBILITY_MS} and {MAX_VISIBILITY_MS}, "
            f"got {visibility}",
        )
    if not 0 <= message.max_deliveries <= MAX_DELIVERIES_LIMIT:
        raise InvalidArgument(
            "max_deliveries",
            f"must be between 0 (keep) and {MAX_DELIVERIES_LIMIT}, got {message.max_deliveries}",
        )
    if not 0 <= message.max_in_flight <= MAX_IN_FLIGHT:
        raise InvalidArgument(
            "max_in_flight",
            f"must be between 0 (default {DEFAULT_IN_FLIGHT}) and {MAX_IN_FLIGHT}, "
            f"got {message.max_in_flight}",
        )
    return OpenRequest(
        subscription=subscription,
        consumer=consumer,
        deployment_id=deployment,
        start=start,
        start_cursor=cursor,
        visibility_ms=visibility,
        max_deliveries=message.max_deliveries,
        max_in_flight=message.max_in_flight or DEFAULT_IN_FLIGHT,
    )


@dataclass(slots=True)
class Lease:
    """An event delivered to this consumer and not yet acknowledged."""

    item: Delivered
    deadline: float
    """time.monotonic() when the visibility timeout expires (the event may then
    go to another consumer, and stops counting against max_in_flight)."""


class Consumer:
    """One Subscribe stream: flow control, acks and the read/claim loop."""

    def __init__(
        self,
        groups: ConsumerGroups,
        hub: Hub,
        config: SubscriptionConfig,
        name: str,
        max_in_flight: int,
    ) -> None:
        self.groups = groups
        self.hub = hub
        self.config = config
        self.name = name
        self.max_in_flight = max_in_flight
        self.leases: dict[bytes, Lease] = {}
        """Unacknowledged deliveries by cursor text (bytes, as sent)."""
        self.wake = asyncio.Event()
        self.hinted: set[str] = set()
        self.dirty: set[str] = set()
        self.sources: list[str] = []
        self.ack_errors: list[pb.AckError] = []
        self.sweep_now = True
        self.deleted = False
        self._next_claim = self._next_sweep = self._next_refresh = 0.0
        """When the next claim of expired deliveries, sweep of sources and re-read of
        the configuration are due (monotonic seconds)."""

    # -- flow control ----------------------------------------------------------

    def free_slots(self, now: float) -> int:
        """max_in_flight minus leases still within their visibility timeout.
        Leases expired for a whole further timeout are forgotten (an ack then
        names an unknown cursor)."""
        visibility = self.config.visibility_ms / 1000
        live = 0
        stale = []
        for cursor, lease in self.leases.items():
            if lease.deadline > now:
                live += 1
            elif lease.deadline + visibility < now:
                stale.append(cursor)
        for cursor in stale:
            del self.leases[cursor]
        return max(0, self.max_in_flight - live)

    def next_deadline(self) -> float | None:
        now = time.monotonic()
        future = [lease.deadline for lease in self.leases.values() if lease.deadline > now]
        return min(future) if future else None

    def lease(self, items: Sequence[Delivered]) -> None:
        deadline = time.monotonic() + self.config.visibility_ms / 1000
        for item in items:
            self.leases[item.cursor] = Lease(item, deadline)

    # -- acknowledgements --------------------------------------------------------

    async def read_acks(self, requests: AsyncIterator[pb.SubscribeRequest]) -> None:
        """Apply the client's acks as they arrive. Returns when the client half-closes."""
        async for request in requests:
            kind = request.WhichOneof("kind")
            if kind == "ack":
                await self.ack(request.ack.cursors)
            elif kind == "open":
                self.ack_errors.append(
                    pb.AckError(
                        reason="INVALID_ARGUMENT: open: only the first message of a call may open",
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    )
                )
            self.wake.set()

    async def ack(self, cursors: Sequence[str]) -> None:
        found: list[Delivered] = []
        for cursor in cursors:
            lease = self.leases.pop(cursor.encode(), None)
            if lease is None:
                self.ack_errors.append(
                    pb.AckError(
                        cursor=cursor[:128],
                        reason="INVALID_ARGUMENT: cursor was not delivered to this consumer "
                        "or is already acknowledged",
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    )
                )
            else:
                found.append(lease.item)
        if found:
            await self.groups.ack(self.config, found)

    # -- hints from the hub --------------------------------------------------------

    async def pump_hints(self, follower: Follower) -> None:
        """Turn the hub's live events into "read this stream" hints."""
        while True:
            try:
                batch = await follower.next_batch(None, 1 << 20)
            except FollowerLagged:
                follower.reset()
                self.sweep_now = True
                self.wake.set()
                continue
            if not batch:
                if self.hub.stopping:
                    self.wake.set()
                    return
                continue
            if follower.deployment_id != ALL:
                self.hinted.add(keys.events(follower.deployment_id))
            else:
                for event in batch.events():
                    self.hinted.add(keys.events(event.cursor.deployment_id))
            self.wake.set()

    # -- the loop ------------------------------------------------------------------

    async def refresh_sources(self) -> None:
        deployments = await self.groups.deployments(self.config)
        replaying = await self.groups.replaying(self.config)
        wanted = set(deployments)
        self.sources = [keys.events(d) for d in deployments] + [
            keys.replays(d, self.config.name)
            for d in replaying
            if self.config.deployment_id == ALL or d in wanted
        ]

    async def run(self, requests: AsyncIterator[pb.SubscribeRequest]) -> AsyncIterator[bytes]:
        """Deliver events until the client leaves, the subscription is deleted or
        the server stops. Yields SubscribeResponse bytes."""
        follower = await self.hub.subscribe(self.config.deployment_id)
        acks = asyncio.create_task(self.read_acks(requests), name=f"acks {self.name}")
        hints = asyncio.create_task(self.pump_hints(follower), name=f"hints {self.name}")
        self._next_claim = self._next_sweep = 0.0
        self._next_refresh = time.monotonic() + CONFIG_REFRESH_SECONDS
        try:
            while not self.hub.stopping:
                self.wake.clear()
                if acks.done():
                    acks.result()  # re-raises a failed ack's error
                    return  # the client half-closed: no more acks can come
                if self.deleted:
                    raise NotFound(f"subscription {self.config.name!r} was deleted")
                out = await self._collect(time.monotonic())
                if out:
                    self.lease(out)
                    for message in delivery_responses(out, MAX_RESPONSE_BYTES):
                        yield message
                if self.ack_errors:
                    errors, self.ack_errors = self.ack_errors, []
                    yield pb.SubscribeResponse(ack_errors=errors).SerializeToString()
                if self.dirty and self.free_slots(time.monotonic()):
                    # Streams that returned a full batch (or were not reached) have
                    # more: read on at once. Each round drains or shrinks the set.
                    continue
                await self._sleep(min(self._next_claim, self._next_sweep, self._next_refresh))
        finally:
            follower.close()
            for task in (acks, hints):
                task.cancel()
            for task in (acks, hints):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _collect(self, now: float) -> list[Delivered]:
        """One round: the periodic chores that are due, then expired deliveries to
        claim again (every visibility/4) and new entries of hinted streams, as many
        as the free delivery slots allow."""
        if now >= self._next_refresh:
            await self._refresh_config()
            self._next_refresh = now + CONFIG_REFRESH_SECONDS
        if self.sweep_now or now >= self._next_sweep:
            self.sweep_now = False
            await self.refresh_sources()
            self.dirty.update(self.sources)
            self._next_sweep = now + SWEEP_SECONDS
        self.dirty |= self.hinted
        self.hinted.clear()
        out: list[Delivered] = []
        free = self.free_slots(now)
        if free and now >= self._next_claim:
            out += await self.groups.claim_expired(self.config, self.name, self.sources, free)
            claim_every = min(SWEEP_SECONDS, max(0.01, self.config.visibility_ms / 4000))
            self._next_claim = now + claim_every
            free -= len(out)
        if free > 0 and self.dirty:
            asked = sorted(self.dirty)
            fresh, more = await self.groups.read_new(self.config, self.name, asked, free)
            self.dirty -= set(asked) - more
            out += fresh
        return out

    async def _sleep(self, until: float) -> None:
        deadline = self.next_deadline()
        if deadline is not None:
            until = min(until, deadline)
        timeout = max(0.0, until - time.monotonic())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wake.wait()

    async def _refresh_config(self) -> None:
        config = await self.groups.get(self.config.name)
        if config is None:
            raise NotFound(f"subscription {self.config.name!r} was deleted")
        self.config = config
