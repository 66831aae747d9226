"""Service metrics (prefix ``activity_``), defined on a registry that is passed in.

One :class:`ServiceMetrics` is built at start-up and handed to the store,
the hub and the servicer, which update its public attributes directly
(``metrics.events_appended.inc()``) or through the few helpers below that
carry a little logic. Tests build their own ``CollectorRegistry`` so they
never see another test's counts. gRPC server metrics live in
:mod:`activity_events.observability.grpc_metrics`, not here.

Naming follows Prometheus conventions so ``promtool check metrics`` is
silent: counters end in ``_total``, durations are in seconds and end in
``_seconds``, and every metric has help text.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from typing import Protocol

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from activity_events import __version__

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Events per CreateEvents call; the top buckets cover settings.max_batch raised above 1000."""

REDIS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
"""Redis answers in well under a millisecond on a healthy network; the default
buckets (from 5 ms) would put every healthy command in the first bucket."""

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Hub lag from XADD to delivery: milliseconds when healthy, seconds when a replica struggles."""


class ServiceMetrics:
    """The service's own metrics. Attributes are prometheus_client metrics; use them directly.

    ``registry`` receives every metric; ``runtime=True`` also registers the
    process, platform and GC collectors there (``process_*``, ``python_*``),
    which the global registry would otherwise provide.
    """

    def __init__(
        self, registry: CollectorRegistry, version: str = __version__, runtime: bool = True
    ) -> None:
        self.registry = registry
        # `*_created` series are an OpenMetrics idea that Go services do not expose;
        # they double the series count and confuse dashboards that sum by __name__.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        if runtime:
            _register_runtime_collectors(registry)

        self.build_info = Gauge(
            "activity_build_info",
            "Always 1; labels carry the running version of the service.",
            ["version", "python_version"],
            registry=registry,
        )
        self.build_info.labels(version=version, python_version=platform.python_version()).set(1)

        # --- events (store outcomes) -------------------------------------------------
        self.events_appended = Counter(
            "activity_events_appended",
            "Events written to Redis (new events; duplicates and conflicts excluded).",
            registry=registry,
        )
        self.events_duplicates = Counter(
            "activity_events_duplicates",
            "Events not written because the same (deployment_id, id, message) was stored before.",
            registry=registry,
        )
        self.events_conflicts = Counter(
            "activity_events_conflicts",
            "Events rejected because their id was stored before with a different message.",
            registry=registry,
        )
        self.events_invalid = Counter(
            "activity_events_invalid",
            "Events rejected by validation (bad deployment_id, id or message).",
            registry=registry,
        )
        self.events_deleted = Counter(
            "activity_events_deleted",
            "Events removed by DeleteDeployment.",
            registry=registry,
        )
        self.batch_size = Histogram(
            "activity_batch_size_events",
            "Events per CreateEvents call.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

        # --- Redis ---------------------------------------------------------------------
        self.redis_command_duration = Histogram(
            "activity_redis_command_duration_seconds",
            "Time of Redis commands as seen by the service, by command "
            "(PIPELINE for a pipeline; blocking reads are not observed).",
            ["command"],
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_command_errors = Counter(
            "activity_redis_command_errors",
            "Redis commands that failed, by command and error class.",
            ["command", "error"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "activity_redis_up",
            "1 when the last Redis health probe succeeded, else 0.",
            registry=registry,
        )

        # --- followers and hub ----------------------------------------------------------
        self.followers = Gauge(
            "activity_followers",
            "WatchEvents streams currently following live events on this replica.",
            registry=registry,
        )
        self.follower_overflows = Counter(
            "activity_follower_overflows",
            "Followers ended with RESOURCE_EXHAUSTED because they fell too far behind.",
            registry=registry,
        )
        self.live_buffered_bytes = Gauge(
            "activity_live_buffered_bytes",
            "Bytes of live events the follower hub holds for followers that are behind.",
            registry=registry,
        )
        self.hub_lag = Histogram(
            "activity_hub_lag_seconds",
            "Time from XADD (the stream entry id's milliseconds) to handing the event "
            "to a follower's queue.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )

        # --- under load ---------------------------------------------------------------
        self.load_shed = Counter(
            "activity_load_shed",
            "Calls and streams refused or ended on purpose to protect the service, by "
            "admission class and reason (inflight: the class budget; followers, "
            "page_streams, consumers: a stream kind's limit; redis_pool: no Redis connection "
            "of the lane came free in time; stalled: the client stopped reading).",
            ["class", "reason"],
            registry=registry,
        )
        self.inflight = Gauge(
            "activity_inflight",
            "Calls (and open streams) in progress, by admission class.",
            ["class"],
            registry=registry,
        )
        self.inflight_limit = Gauge(
            "activity_inflight_limit",
            "The admission budget of each class (max_inflight_*, max_streams).",
            ["class"],
            registry=registry,
        )
        self.streams_open = Gauge(
            "activity_streams_open",
            "Long-lived streams open now, by kind (followers, page_streams, consumers).",
            ["kind"],
            registry=registry,
        )
        self.streams_limit = Gauge(
            "activity_streams_limit",
            "The limit of each stream kind (max_followers, max_page_streams, max_consumers).",
            ["kind"],
            registry=registry,
        )
        self.redis_lane_busy = Gauge(
            "activity_redis_lane_busy_connections",
            "Redis connections of each lane (writes, reads, streams) in use now.",
            ["lane"],
            registry=registry,
        )
        self.redis_lane_connections = Gauge(
            "activity_redis_lane_connections",
            "Redis connections of each lane (redis_*_connections).",
            ["lane"],
            registry=registry,
        )

    def record_outcomes(
        self, created: int = 0, duplicates: int = 0, conflicts: int = 0, invalid: int = 0
    ) -> None:
        """Count the outcomes of one CreateEvent or CreateEvents call."""
        if created:
            self.events_appended.inc(created)
        if duplicates:
            self.events_duplicates.inc(duplicates)
        if conflicts:
            self.events_conflicts.inc(conflicts)
        if invalid:
            self.events_invalid.inc(invalid)

    def observe_hub_lag(self, entry_id: str | bytes, now: float | None = None) -> None:
        """Observe the lag of one delivered entry from its Redis stream id ``<ms>-<seq>``.

        The id's milliseconds are Redis' clock at XADD; ``now`` (Unix seconds,
        default the current time) is ours. Skew between the two clocks can make
        the difference negative; it is clamped to zero rather than dropped, so
        the count still matches deliveries.
        """
        raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            added_ms = int(raw.split("-", 1)[0])
        except ValueError:
            logger.debug("Not a stream entry id: %r", raw)
            return
        current = time.time() if now is None else now
        self.hub_lag.observe(max(0.0, current - added_ms / 1000.0))


def _register_runtime_collectors(registry: CollectorRegistry) -> None:
    """Process/platform/GC collectors on ``registry`` (the default registry has them already)."""
    if registry is REGISTRY:
        return
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class SubscriptionState(Protocol):
    """What the state gauges show of a subscription (``redis.groups.SubscriptionStats``)."""

    @property
    def lag(self) -> int: ...

    @property
    def pending(self) -> int: ...

    @property
    def dead_letters(self) -> int: ...


class SubscriptionMetrics:
    """Per-subscription metrics (prefix ``activity_subscription_``) on the given registry.

    Counters count what this replica did; gauges are refreshed from Redis by
    whichever replica last looked, so dashboards take ``max`` across replicas.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        label = ["subscription"]
        self.delivered = Counter(
            "activity_subscription_delivered_total",
            "Events delivered to consumers (first deliveries and redeliveries).",
            label,
            registry=registry,
        )
        self.acknowledged = Counter(
            "activity_subscription_acknowledged_total",
            "Events acknowledged by consumers.",
            label,
            registry=registry,
        )
        self.redeliveries = Counter(
            "activity_subscription_redeliveries_total",
            "Events delivered again after their visibility timeout expired.",
            label,
            registry=registry,
        )
        self.dead_lettered = Counter(
            "activity_subscription_dead_lettered_total",
            "Events moved to the dead letters after max_deliveries deliveries.",
            label,
            registry=registry,
        )
        self.lag = Gauge(
            "activity_subscription_lag",
            "Events stored but not yet delivered to any consumer of the subscription.",
            label,
            registry=registry,
        )
        self.pending = Gauge(
            "activity_subscription_pending",
            "Events delivered and not yet acknowledged.",
            label,
            registry=registry,
        )
        self.dead_letters = Gauge(
            "activity_subscription_dead_letters",
            "Events currently in the subscription's dead letters.",
            label,
            registry=registry,
        )
        self.consumers = Gauge(
            "activity_subscription_consumers",
            "Consumers of the subscription connected to this replica.",
            label,
            registry=registry,
        )

    def observe(self, name: str, stats: SubscriptionState) -> None:
        self.lag.labels(name).set(stats.lag)
        self.pending.labels(name).set(stats.pending)
        self.dead_letters.labels(name).set(stats.dead_letters)

    def stop_observing(self, name: str) -> None:
        """This replica no longer refreshes the subscription's state gauges (its
        last consumer here left): drop them rather than leave stale values for
        ``max`` across replicas to pick up."""
        for metric in (self.lag, self.pending, self.dead_letters):
            with contextlib.suppress(KeyError):
                metric.remove(name)

    def forget(self, name: str) -> None:
        """Drop a deleted subscription's series."""
        for metric in (
            self.delivered,
            self.acknowledged,
            self.redeliveries,
            self.dead_lettered,
            self.lag,
            self.pending,
            self.dead_letters,
            self.consumers,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(name)
