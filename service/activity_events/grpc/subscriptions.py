"""The Subscriptions service: durable, acknowledged delivery over a bidi stream.

``Subscribe`` runs one :class:`~activity_events.grpc.consumer.Consumer` per
call; the other methods manage subscriptions and their dead letters. Auth,
admission (a consumer is a long-lived stream of kind ``consumers``), parsing,
statuses, metrics and logs are the call pipeline's, configured by
:data:`POLICIES`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from activity_events.domain.errors import ActivityError, InvalidArgument, NotFound
from activity_events.domain.events import Cursor, validate_deployment_id
from activity_events.domain.limits import ALL, DEFAULT_PAGE, MAX_PAGE
from activity_events.grpc.admission import CallClass, StreamKind
from activity_events.grpc.consumer import Consumer, OpenRequest, validate_open
from activity_events.grpc.pipeline import Policy
from activity_events.live.hub import Hub
from activity_events.observability.metrics import SubscriptionMetrics
from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis.groups import (
    ConsumerGroups,
    SubscriptionConfig,
    SubscriptionStats,
    validate_name,
)
from activity_events.redis.store import EventStore

if TYPE_CHECKING:
    from activity_events.app.settings import Settings

logger = logging.getLogger(__name__)

SUBSCRIPTIONS_SERVICE = pb.DESCRIPTOR.services_by_name["Subscriptions"].full_name
"""Full gRPC service name, for reflection and health."""

OPEN_TIMEOUT_SECONDS = 30.0
"""How long a new Subscribe call may take to send its open message."""
STATS_SECONDS = 5.0
"""How often the lag/pending gauges of subscriptions with local consumers are refreshed."""

POLICIES: dict[str, Policy] = {
    # Consuming (and acknowledging) is reading; removing a subscription or
    # re-injecting dead letters changes what others see.
    "Subscribe": Policy(StreamKind.CONSUMERS, "reader"),
    "ListSubscriptions": Policy(CallClass.READS, "reader"),
    "ListDeadLetters": Policy(CallClass.READS, "reader"),
    "DeleteSubscription": Policy(CallClass.READS, "admin"),
    "ReplayDeadLetters": Policy(CallClass.READS, "admin"),
}
"""How the pipeline admits and authorises each method (see Policy)."""


class SubscriptionsService:
    """Implements activityevents.Subscriptions; see the module docstring."""

    def __init__(
        self,
        store: EventStore,
        hub: Hub,
        settings: Settings,
        registry: CollectorRegistry,
    ) -> None:
        self.metrics = SubscriptionMetrics(registry)
        self.groups = ConsumerGroups(store, self.metrics)
        self._hub = hub
        self._settings = settings
        self._consumers: dict[str, set[Consumer]] = {}
        self._monitor: asyncio.Task[None] | None = None

    # -- Subscribe -------------------------------------------------------------------

    async def Subscribe(
        self, requests: AsyncIterator[pb.SubscribeRequest], context: Any
    ) -> AsyncIterator[bytes]:
        opening = await self._first(requests)
        config = await self.groups.open(
            opening.subscription,
            opening.deployment_id,
            start=opening.start,
            start_cursor=opening.start_cursor,
            visibility_ms=opening.visibility_ms,
            max_deliveries=opening.max_deliveries,
        )
        consumer = Consumer(self.groups, self._hub, config, opening.consumer, opening.max_in_flight)
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
                    self.metrics.observe(name, await self.groups.stats(config))
                except ActivityError as error:
                    logger.warning("stats of subscription %s unavailable: %s", name, error)
            await asyncio.sleep(STATS_SECONDS)

    # -- management ------------------------------------------------------------------

    async def ListSubscriptions(
        self, request: pb.ListSubscriptionsRequest, context: Any
    ) -> pb.ListSubscriptionsResponse:
        response = pb.ListSubscriptionsResponse()
        for config in await self.groups.all():
            stats = await self.groups.stats(config)
            self.metrics.observe(config.name, stats)
            response.subscriptions.append(_subscription(config, stats))
        return response

    async def DeleteSubscription(
        self, request: pb.DeleteSubscriptionRequest, context: Any
    ) -> pb.DeleteSubscriptionResponse:
        name = validate_name(request.subscription, "subscription")
        removed = await self.groups.delete(name)
        for consumer in self._consumers.get(name, set()):
            consumer.deleted = True
            consumer.wake.set()
        return pb.DeleteSubscriptionResponse(deleted_dead_letters=removed)

    async def _config(self, name: str) -> SubscriptionConfig:
        validate_name(name, "subscription")
        config = await self.groups.get(name)
        if config is None:
            raise NotFound(f"subscription {name!r} does not exist")
        return config

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Any
    ) -> pb.ListDeadLettersResponse:
        config = await self._config(request.subscription)
        deployment = _scoped_deployment(config, request.deployment_id)
        size = request.page_size or DEFAULT_PAGE
        if not 0 < size <= MAX_PAGE:
            raise InvalidArgument(
                "page_size", f"must be between 0 and {MAX_PAGE}, got {request.page_size}"
            )
        after = _decode_token(request.page_token) if request.page_token else None
        letters, resume = await self.groups.dead_letters(config, deployment, after, size)
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

    async def ReplayDeadLetters(
        self, request: pb.ReplayDeadLettersRequest, context: Any
    ) -> pb.ReplayDeadLettersResponse:
        config = await self._config(request.subscription)
        deployment = _scoped_deployment(config, request.deployment_id)
        ids = [
            Cursor.parse(text, deployment_id=config.deployment_id, field="ids")
            for text in request.ids
        ]
        if ids and request.deployment_id:
            raise InvalidArgument("deployment_id", "give either ids or deployment_id")
        replayed = await self.groups.replay(config, ids, deployment)
        for consumer in self._consumers.get(config.name, set()):
            consumer.sweep_now = True
            consumer.wake.set()
        return pb.ReplayDeadLettersResponse(replayed=replayed)


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
