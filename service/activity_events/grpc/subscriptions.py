"""The Subscriptions gRPC servicer: durable, acknowledged delivery over a bidi stream.

One :class:`Consumer` serves one ``Subscribe`` call. It holds no Redis
connection of its own: every read is a non-blocking XREADGROUP on the shared,
bounded command pool, so a replica's Redis connections do not grow with its
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
import base64
import binascii
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from activity_events.app.settings import Settings
from activity_events.codec.wire import chunked, field_1, identity, varint
from activity_events.domain.errors import (
    ActivityError,
    Exhausted,
    FollowerLagged,
    InvalidArgument,
    NotFound,
)
from activity_events.domain.events import Cursor, validate_deployment_id
from activity_events.grpc.events import status_of
from activity_events.live.hub import ALL, Hub, Subscription
from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis import keys
from activity_events.redis.groups import (
    MAX_DELIVERIES_LIMIT,
    MAX_VISIBILITY_MS,
    Delivered,
    SubscriptionConfig,
    SubscriptionMetrics,
    SubscriptionStats,
    SubscriptionStore,
    validate_name,
)
from activity_events.redis.store import EventStore

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

SUBSCRIPTIONS_SERVICE = pb.DESCRIPTOR.services_by_name["Subscriptions"].full_name
"""Full gRPC service name, for reflection and health."""

DEFAULT_IN_FLIGHT = 100
MAX_IN_FLIGHT = 10_000
MIN_VISIBILITY_MS = 10
OPEN_TIMEOUT_SECONDS = 30.0
"""How long a new Subscribe call may take to send its open message."""
SWEEP_SECONDS = 1.0
"""Longest time between two reads of every stream of a subscription (see module docstring)."""
CONFIG_REFRESH_SECONDS = 2.0
"""How often a consumer re-reads its subscription's settings (and notices a delete)."""
STATS_SECONDS = 5.0
"""How often the lag/pending gauges of subscriptions with local consumers are refreshed."""
MAX_RESPONSE_BYTES = 1 << 20
"""Largest SubscribeResponse assembled, well under gRPC's default 4 MiB client limit."""
DEFAULT_PAGE = 100
MAX_PAGE = 1000

_STARTS = {
    pb.START_POSITION_UNSPECIFIED: "beginning",
    pb.START_POSITION_BEGINNING: "beginning",
    pb.START_POSITION_NOW: "now",
    pb.START_POSITION_CURSOR: "cursor",
}


def delivery_bytes(item: Delivered) -> bytes:
    """``SubscribeResponse.deliveries`` entry (field 1) of one Delivery, assembled
    from the stored EventRequest bytes without decoding them:
    Delivery { EventRequest event = 1; string cursor = 2; int32 delivery_count = 3; }."""
    payload = item.payload
    cursor = item.cursor
    body = b"".join(
        (
            b"\x0a",
            varint(len(payload)),
            payload,
            b"\x12",
            varint(len(cursor)),
            cursor,
            b"\x18",
            varint(item.count),
        )
    )
    return field_1(body)


def delivery_responses(items: Sequence[Delivered], max_bytes: int) -> Iterator[bytes]:
    """SubscribeResponse messages carrying ``items`` in order, each about ``max_bytes`` at most."""
    return chunked((delivery_bytes(item) for item in items), max_bytes)


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
        subs: SubscriptionStore,
        hub: Hub,
        config: SubscriptionConfig,
        name: str,
        max_in_flight: int,
    ) -> None:
        self.subs = subs
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
            await self.subs.ack(self.config, found)

    # -- hints from the hub --------------------------------------------------------

    async def pump_hints(self, follower: Subscription) -> None:
        """Turn the hub's live events into "read this stream" hints."""
        while True:
            try:
                batch = await follower.next_batch(None, 1 << 20)
            except FollowerLagged:
                follower.reset()
                self.sweep_now = True
                self.wake.set()
                continue
            if not batch:  # the hub is stopping
                self.wake.set()
                return
            for event in batch:
                self.hinted.add(keys.events(event.cursor.deployment_id))
            self.wake.set()

    # -- the loop ------------------------------------------------------------------

    async def refresh_sources(self) -> None:
        deployments = await self.subs.deployments(self.config)
        replaying = await self.subs.replaying(self.config)
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
        claim_every = min(SWEEP_SECONDS, max(0.01, self.config.visibility_ms / 4000))
        next_claim = 0.0
        next_sweep = 0.0
        next_refresh = time.monotonic() + CONFIG_REFRESH_SECONDS
        try:
            while not self.hub.stopping:
                self.wake.clear()
                if acks.done():
                    acks.result()  # re-raises a failed ack's error
                    return  # the client half-closed: no more acks can come
                if self.deleted:
                    raise NotFound(f"subscription {self.config.name!r} was deleted")
                now = time.monotonic()
                if now >= next_refresh:
                    await self._refresh_config()
                    next_refresh = now + CONFIG_REFRESH_SECONDS
                    claim_every = min(SWEEP_SECONDS, max(0.01, self.config.visibility_ms / 4000))
                if self.sweep_now or now >= next_sweep:
                    self.sweep_now = False
                    await self.refresh_sources()
                    self.dirty.update(self.sources)
                    next_sweep = now + SWEEP_SECONDS
                self.dirty |= self.hinted
                self.hinted.clear()
                out: list[Delivered] = []
                free = self.free_slots(now)
                if free and now >= next_claim:
                    out += await self.subs.claim_expired(self.config, self.name, self.sources, free)
                    next_claim = now + claim_every
                    free -= len(out)
                if free > 0 and self.dirty:
                    asked = sorted(self.dirty)
                    fresh, more = await self.subs.read_new(self.config, self.name, asked, free)
                    self.dirty -= set(asked) - more
                    out += fresh
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
                await self._sleep(min(next_claim, next_sweep, next_refresh))
        finally:
            follower.close()
            for task in (acks, hints):
                task.cancel()
            for task in (acks, hints):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _sleep(self, until: float) -> None:
        deadline = self.next_deadline()
        if deadline is not None:
            until = min(until, deadline)
        timeout = max(0.0, until - time.monotonic())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wake.wait()

    async def _refresh_config(self) -> None:
        config = await self.subs.get(self.config.name)
        if config is None:
            raise NotFound(f"subscription {self.config.name!r} was deleted")
        self.config = config


class SubscriptionsServicer:
    """Implements activityevents.Subscriptions; see the module docstring."""

    def __init__(
        self,
        store: EventStore,
        hub: Hub,
        settings: Settings,
        registry: CollectorRegistry,
    ) -> None:
        self.metrics = SubscriptionMetrics(registry)
        self.subs = SubscriptionStore(store, self.metrics)
        self._hub = hub
        self._settings = settings
        self._consumers: dict[str, set[Consumer]] = {}
        self._monitor: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def _call(self, context: Context) -> AsyncIterator[None]:
        try:
            yield
        except ActivityError as error:
            await context.abort(status_of(error), str(error))

    # -- Subscribe -------------------------------------------------------------------

    async def Subscribe(
        self, requests: AsyncIterator[pb.SubscribeRequest], context: Context
    ) -> AsyncIterator[bytes]:
        async with self._call(context):
            opening = await self._first(requests)
            connected = sum(len(c) for c in self._consumers.values())
            if connected >= self._settings.max_followers:
                raise Exhausted(
                    f"too many consumers on this replica (limit {self._settings.max_followers}, "
                    "the max_followers setting); retry later or on another replica"
                )
            config = await self.subs.open(
                opening.subscription,
                opening.deployment_id,
                start=opening.start,
                start_cursor=opening.start_cursor,
                visibility_ms=opening.visibility_ms,
                max_deliveries=opening.max_deliveries,
            )
            consumer = Consumer(
                self.subs, self._hub, config, opening.consumer, opening.max_in_flight
            )
            opened = pb.SubscribeOpened(
                consumer=opening.consumer, subscription=_subscription(config, None)
            )
            yield pb.SubscribeResponse(opened=opened).SerializeToString()
            self._register(consumer)
            logger.info("consumer %s of subscription %s connected", consumer.name, config.name)
            try:
                async for message in consumer.run(requests):
                    yield message
            finally:
                self._unregister(consumer)
                logger.info(
                    "consumer %s of subscription %s left with %d unacknowledged",
                    consumer.name,
                    config.name,
                    len(consumer.leases),
                )

    async def _first(self, requests: AsyncIterator[pb.SubscribeRequest]) -> OpenRequest:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_SECONDS):
                first = await anext(requests, None)
        except TimeoutError:
            raise InvalidArgument(
                "open", f"no open message within {OPEN_TIMEOUT_SECONDS:.0f}s"
            ) from None
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidArgument("open", "the first message of Subscribe must be open")
        return validate_open(first.open)

    def _register(self, consumer: Consumer) -> None:
        name = consumer.config.name
        self._consumers.setdefault(name, set()).add(consumer)
        self.metrics.consumers.labels(name).set(len(self._consumers[name]))
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch_stats(), name="subscription stats")

    def _unregister(self, consumer: Consumer) -> None:
        name = consumer.config.name
        local = self._consumers.get(name, set())
        local.discard(consumer)
        if not local:
            self._consumers.pop(name, None)
            self.metrics.stop_observing(name)
        if not consumer.deleted:
            self.metrics.consumers.labels(name).set(len(local))
        if not self._consumers and self._monitor is not None:
            # The last consumer left (at the latest when the server stops): no
            # task outlives the streams.
            self._monitor.cancel()
            self._monitor = None

    async def _watch_stats(self) -> None:
        """Refresh the lag/pending gauges of subscriptions consumed on this replica."""
        while self._consumers and not self._hub.stopping:
            for name in list(self._consumers):
                consumers = self._consumers.get(name)
                if not consumers:
                    continue
                config = next(iter(consumers)).config
                try:
                    self.metrics.observe(name, await self.subs.stats(config))
                except ActivityError as error:
                    logger.warning("stats of subscription %s unavailable: %s", name, error)
            await asyncio.sleep(STATS_SECONDS)

    # -- management ------------------------------------------------------------------

    async def ListSubscriptions(
        self, request: pb.ListSubscriptionsRequest, context: Context
    ) -> pb.ListSubscriptionsResponse:
        async with self._call(context):
            response = pb.ListSubscriptionsResponse()
            for config in await self.subs.all():
                stats = await self.subs.stats(config)
                self.metrics.observe(config.name, stats)
                response.subscriptions.append(_subscription(config, stats))
            return response
        raise AssertionError("unreachable")  # abort() raised

    async def DeleteSubscription(
        self, request: pb.DeleteSubscriptionRequest, context: Context
    ) -> pb.DeleteSubscriptionResponse:
        async with self._call(context):
            name = validate_name(request.subscription, "subscription")
            removed = await self.subs.delete(name)
            for consumer in self._consumers.get(name, set()):
                consumer.deleted = True
                consumer.wake.set()
            return pb.DeleteSubscriptionResponse(deleted_dead_letters=removed)
        raise AssertionError("unreachable")

    async def _config(self, name: str) -> SubscriptionConfig:
        validate_name(name, "subscription")
        config = await self.subs.get(name)
        if config is None:
            raise NotFound(f"subscription {name!r} does not exist")
        return config

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        async with self._call(context):
            config = await self._config(request.subscription)
            deployment = _scoped_deployment(config, request.deployment_id)
            size = request.page_size or DEFAULT_PAGE
            if not 0 < size <= MAX_PAGE:
                raise InvalidArgument(
                    "page_size", f"must be between 0 and {MAX_PAGE}, got {request.page_size}"
                )
            after = _decode_token(request.page_token) if request.page_token else None
            letters, resume = await self.subs.dead_letters(config, deployment, after, size)
            response = pb.ListDeadLettersResponse(
                next_page_token=_encode_token(resume) if resume is not None else ""
            )
            for letter in letters:
                response.dead_letters.add(
                    id=str(letter.id),
                    event=letter.event.to_proto(),
                    delivery_count=letter.deliveries,
                    consumer=letter.consumer,
                    dead_letter_time_ms=letter.time_ms,
                )
            return response
        raise AssertionError("unreachable")

    async def ReplayDeadLetters(
        self, request: pb.ReplayDeadLettersRequest, context: Context
    ) -> pb.ReplayDeadLettersResponse:
        async with self._call(context):
            config = await self._config(request.subscription)
            deployment = _scoped_deployment(config, request.deployment_id)
            ids = [
                Cursor.parse(text, deployment_id=config.deployment_id, field="ids")
                for text in request.ids
            ]
            if ids and request.deployment_id:
                raise InvalidArgument("deployment_id", "give either ids or deployment_id")
            replayed = await self.subs.replay(config, ids, deployment)
            for consumer in self._consumers.get(config.name, set()):
                consumer.sweep_now = True
                consumer.wake.set()
            return pb.ReplayDeadLettersResponse(replayed=replayed)
        raise AssertionError("unreachable")


def _scoped_deployment(config: SubscriptionConfig, deployment_id: int) -> int:
    deployment = validate_deployment_id(deployment_id, allow_all=True)
    if deployment and config.deployment_id not in (ALL, deployment):
        raise InvalidArgument(
            "deployment_id",
            f"subscription {config.name!r} is on deployment {config.deployment_id}",
        )
    return deployment or config.deployment_id


def _subscription(config: SubscriptionConfig, stats: SubscriptionStats | None) -> pb.Subscription:
    out = pb.Subscription(
        name=config.name,
        deployment_id=config.deployment_id,
        visibility_timeout_ms=config.visibility_ms,
        max_deliveries=config.max_deliveries,
        create_time_ms=config.created_ms,
    )
    if stats is not None:
        out.lag = stats.lag
        out.pending = stats.pending
        out.dead_letters = stats.dead_letters
        out.consumers = stats.consumers
    return out


def _encode_token(position: Cursor) -> str:
    return base64.urlsafe_b64encode(str(position).encode()).decode()


def _decode_token(token: str) -> Cursor:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this server issued") from None
    return Cursor.parse(text, deployment_id=0, field="page_token")


def generic_handler(servicer: SubscriptionsServicer) -> grpc.GenericRpcHandler[Any, Any]:
    """The service's method handlers; Subscribe yields wire bytes (identity serializer)."""
    handlers: dict[str, Any] = {
        "Subscribe": grpc.stream_stream_rpc_method_handler(
            servicer.Subscribe,
            request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=identity,
        ),
        "ListSubscriptions": grpc.unary_unary_rpc_method_handler(
            servicer.ListSubscriptions,
            request_deserializer=pb.ListSubscriptionsRequest.FromString,
            response_serializer=pb.ListSubscriptionsResponse.SerializeToString,
        ),
        "DeleteSubscription": grpc.unary_unary_rpc_method_handler(
            servicer.DeleteSubscription,
            request_deserializer=pb.DeleteSubscriptionRequest.FromString,
            response_serializer=pb.DeleteSubscriptionResponse.SerializeToString,
        ),
        "ListDeadLetters": grpc.unary_unary_rpc_method_handler(
            servicer.ListDeadLetters,
            request_deserializer=pb.ListDeadLettersRequest.FromString,
            response_serializer=pb.ListDeadLettersResponse.SerializeToString,
        ),
        "ReplayDeadLetters": grpc.unary_unary_rpc_method_handler(
            servicer.ReplayDeadLetters,
            request_deserializer=pb.ReplayDeadLettersRequest.FromString,
            response_serializer=pb.ReplayDeadLettersResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SUBSCRIPTIONS_SERVICE, handlers)
