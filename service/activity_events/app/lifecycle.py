"""One server process, started and stopped as a stack of components.

Each component is started in order and its stop is pushed on an
:class:`~contextlib.AsyncExitStack` as soon as it runs, so a failed start
stops exactly what had started, and stopping is start in reverse by
construction. The order is chosen so that the reverse is a graceful shutdown:

========================================  ===========================================
start                                     stop (reverse)
========================================  ===========================================
Redis (embedded when no URL)              stopped last (its AOF flushed)
Redis lanes, store                        connections closed
HTTP side port (/metrics, probes)         closed after the gRPC server
memory trimmer (after bursts of reads)    stopped
gRPC server bound, stream watchdog        ``server.stop(grace)``: in-flight calls drain
admission budgets                         wait (within the grace) for writes and reads
follower hub                              stopped: live streams end cleanly
activity page                             its live streams end (browsers resume)
drain switch                              new calls get UNAVAILABLE (health excepted)
health (probe thread)                     NOT_SERVING first: Watch streams see it
gRPC server started                       --
========================================  ===========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from prometheus_client import CollectorRegistry

from activity_events import SERVICE_NAME
from activity_events.app.embedded import EmbeddedRedis
from activity_events.app.memory import MemoryTrimmer
from activity_events.app.settings import Settings
from activity_events.grpc import auth, health, tls
from activity_events.grpc.admission import Admission, CallClass
from activity_events.grpc.events import POLICIES as EVENTS_POLICIES
from activity_events.grpc.events import ActivityEventsService
from activity_events.grpc.health import HealthMonitor
from activity_events.grpc.pipeline import Pipeline, Policy
from activity_events.grpc.subscriptions import POLICIES as SUBSCRIPTIONS_POLICIES
from activity_events.grpc.subscriptions import SUBSCRIPTIONS_SERVICE, SubscriptionsService
from activity_events.grpc.watchdog import StreamWatchdog
from activity_events.http.page import ActivityPage, start_page
from activity_events.http.server import MetricsServer
from activity_events.live.hub import BlockingReader, Hub, NotifiedReader, Reader
from activity_events.observability import logs
from activity_events.observability.grpc_metrics import GrpcServerMetrics
from activity_events.observability.metrics import ServiceMetrics
from activity_events.observability.redis_observer import RedisObserver, instrument_redis
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from activity_events.redis import connection
from activity_events.redis.lanes import Lane, Lanes
from activity_events.redis.store import EventStore, unparsed

logger = logging.getLogger(__name__)

REFLECTED = (
    SERVICE_NAME,
    SUBSCRIPTIONS_SERVICE,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)

REFLECTION_POLICIES = {
    "ServerReflectionInfo": Policy(CallClass.READS, role=auth.ANY_TOKEN, quiet=True)
}
"""Reflection reads the schema: any valid token (or none with auth_reflection=open)."""

MAX_PENDING_REQUESTS = 100_000
"""Calls grpc may hold before the application takes them. Its default (1,000,
randomly refusing beyond) drops bursts as CANCELLED with no trace on the
server; admission control answers every call instead, at once."""


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """gRPC core options, each deliberate (see docs/architecture.md, "Known pitfalls")."""
    options: list[tuple[str, Any]] = [
        # A second process on the same port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        # Every call reaches the pipeline, which refuses what it cannot take
        # with RESOURCE_EXHAUSTED, rather than grpc cancelling it silently.
        ("grpc.server.max_pending_requests", MAX_PENDING_REQUESTS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_REQUESTS),
        # Detect dead followers: ping idle connections, and let clients ping us.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if settings.max_connection_age_seconds > 0:
        # Long-lived HTTP/2 connections are closed now and then so clients
        # behind an L4 balancer spread over new replicas.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                int(settings.max_connection_age_grace_seconds * 1000),
            ),
        ]
    return options


class Application:
    """One server process (see the module docstring). ``registry`` receives the
    metrics (tests pass a fresh one)."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServiceMetrics(self.registry)
        self.admission = Admission(settings, self.metrics)
        self.port = 0
        self.metrics_port = 0
        self._stack: contextlib.AsyncExitStack | None = None
        self._deadline = 0.0
        # Set while running, for probes, tests and the shutdown order:
        self.lanes: Lanes | None = None
        self.store: EventStore | None = None
        self.hub: Hub | None = None
        self.health: HealthMonitor | None = None
        self.pipeline: Pipeline | None = None
        self.server: grpc.aio.Server | None = None
        self.http: MetricsServer | None = None
        self.page: ActivityPage | None = None

    def ready(self) -> bool:
        """/readyz: Redis reachable and not shutting down."""
        return self.health is not None and self.health.serving and not self.health.shutting_down

    async def start(self) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            self._deadline = asyncio.get_running_loop().time()
            await stack.aclose()
            raise
        self._stack = stack

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings, metrics = self.settings, self.metrics
        url = await self._redis(stack)
        target = connection.parse(url)
        logger.info("using redis (%s) at %s", target.mode, logs.redact(url))

        self.lanes = self._lanes(url, target.cluster)
        stack.push_async_callback(self.lanes.aclose)
        store = self.store = EventStore(self.lanes, settings, cluster=target.cluster)
        hub = self.hub = self._hub(url, target, store)

        self.health = HealthMonitor(
            lambda: connection.connect(
                settings, url, max_connections=1, socket_timeout=health.PROBE_TIMEOUT
            ),
            on_change=lambda up: metrics.redis_up.set(1 if up else 0),
        )
        for lane in self.lanes:
            lane.on_failure = self.health.poke

        self.http = MetricsServer(
            self.registry, settings.metrics_host, settings.metrics_port, readiness=self.ready
        )
        await self.http.start()
        stack.push_async_callback(self.http.stop)
        self.metrics_port = self.http.port
        trimmer = MemoryTrimmer(
            lambda: (
                self.admission.classes[CallClass.READS].active
                + self.admission.classes[CallClass.STREAMS].active
            )
        )
        trimmer.start()
        stack.push_async_callback(trimmer.stop)

        watchdog = StreamWatchdog(settings.stream_stall_seconds)
        stack.push_async_callback(watchdog.stop)
        server = self.server = self._grpc_server(store, hub, watchdog)
        stack.push_async_callback(self._stop_server)
        stack.push_async_callback(self._wait_idle)

        hub.start()
        stack.push_async_callback(hub.stop)
        self.page = await start_page(
            settings,
            store,
            hub,
            self.http,
            admission=self.admission,
            authenticator=self._authenticator,
        )
        if self.page is not None:
            stack.push_async_callback(self.page.stop)
        stack.callback(self._drain)

        await self.health.start()
        stack.push_async_callback(self.health.shutdown)
        await server.start()
        logger.info("Server has been started on %d", self.port)
        if not self.health.serving:
            logger.warning(
                "redis is not reachable yet (%s); serving NOT_SERVING until it is",
                self.health.reason or "no answer",
            )

    async def _redis(self, stack: contextlib.AsyncExitStack) -> str:
        """The Redis URL: the setting, or an embedded Redis started now."""
        if self.settings.redis_url is not None:
            return self.settings.redis_url.get_secret_value()
        embedded = EmbeddedRedis(self.settings.data_dir)
        await embedded.start()
        stack.push_async_callback(embedded.stop)
        return embedded.url

    def _lanes(self, url: str, cluster: bool) -> Lanes:
        """One Redis client per admission class (see :mod:`activity_events.redis.lanes`)."""
        settings, metrics = self.settings, self.metrics

        def lane(name: str, connections: int, setting: str) -> Lane:
            client = connection.connect(
                settings,
                url,
                max_connections=connections,
                socket_timeout=settings.redis_timeout_seconds,
            )
            observer = RedisObserver(metrics)
            instrument_redis(client, metrics)
            raw = None
            if not cluster:
                raw = type(client)(connection_pool=client.connection_pool)
                raw.set_response_callback("XRANGE", unparsed)
                instrument_redis(raw, metrics)
            made = Lane(
                name,
                client,
                connections,
                setting=setting,
                timeout=settings.redis_timeout_seconds,
                pool_wait=settings.redis_pool_wait_seconds,
                raw=raw,
                refuse=self.admission.refuse,
                observer=observer,
            )
            metrics.redis_lane_connections.labels(name).set(connections)
            metrics.redis_lane_busy.labels(name).set_function(lambda: made.busy)
            return made

        return Lanes(
            lane("writes", settings.redis_write_connections, "redis_write_connections"),
            lane("reads", settings.redis_read_connections, "redis_read_connections"),
            lane("streams", settings.redis_stream_connections, "redis_stream_connections"),
        )

    def _hub(self, url: str, target: connection.Target, store: EventStore) -> Hub:
        settings, metrics = self.settings, self.metrics
        # The hub's own connection blocks for hub_block_ms; its socket timeout
        # must be longer, or redis-py would report an idle stream as an error.
        hub_client = connection.connect(
            settings,
            url,
            max_connections=1,
            socket_timeout=settings.hub_block_ms / 1000 + settings.redis_timeout_seconds + 1,
        )
        instrument_redis(hub_client, metrics)  # its blocking reads are neither timed nor traced
        reader: Reader
        if target.cluster:
            reader = NotifiedReader(
                hub_client,
                lambda attempt: connection.node_client(
                    settings, target, attempt, socket_timeout=None
                ),
            )
        else:
            reader = BlockingReader(hub_client)
        hub = Hub(
            reader,
            store,
            block_ms=settings.hub_block_ms,
            log_events=settings.follower_queue,
            log_bytes=settings.live_log_bytes,
            wakeups_per_second=settings.live_wakeups_per_second,
            on_delivery=lambda event: metrics.observe_hub_lag(event.cursor.entry_id),
        )
        metrics.followers.set_function(lambda: hub.follower_count)
        metrics.live_buffered_bytes.set_function(lambda: hub.buffered_bytes)
        return hub

    @property
    def _authenticator(self) -> auth.Authenticator | None:
        if self.pipeline is None:
            return None
        return self.pipeline.authenticator

    def _grpc_server(
        self, store: EventStore, hub: Hub, watchdog: StreamWatchdog
    ) -> grpc.aio.Server:
        """The gRPC server, every service registered through the call pipeline, bound."""
        settings = self.settings
        assert self.health is not None
        pipeline = self.pipeline = Pipeline(
            admission=self.admission,
            metrics=GrpcServerMetrics(self.registry),
            watchdog=watchdog,
            authenticator=auth.authenticator(
                settings.auth_tokens_file, reflection=settings.auth_reflection
            ),
        )
        server = grpc.aio.server(options=server_options(settings))
        events = ActivityEventsService(store, hub, settings, self.metrics)
        subscriptions = SubscriptionsService(store, hub, settings, self.registry)
        pipeline.add(server, pb_grpc.add_ActivityEventsServicer_to_server, events, EVENTS_POLICIES)
        pipeline.add(
            server,
            pb_grpc.add_SubscriptionsServicer_to_server,
            subscriptions,
            SUBSCRIPTIONS_POLICIES,
        )
        pipeline.add(
            server,
            health_pb2_grpc.add_HealthServicer_to_server,
            self.health.servicer,
            health.POLICIES,
        )
        if settings.reflection:
            pipeline.add(
                server,
                reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                ReflectionServicer(REFLECTED),
                REFLECTION_POLICIES,
            )
        address = f"{settings.host}:{settings.port}"
        self.port = tls.add_port(server, address, settings)  # plaintext unless TLS is set
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        return server

    # -- stopping ------------------------------------------------------------------

    def _drain(self) -> None:
        """New calls are refused with UNAVAILABLE (retry elsewhere) rather than cut
        off with CANCELLED once the gRPC server stops accepting."""
        if self.pipeline is not None:
            self.pipeline.draining = True

    def _remaining(self) -> float:
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def _wait_idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._remaining()):
                await self.admission.wait_idle(CallClass.WRITES, CallClass.READS)

    async def _stop_server(self) -> None:
        if self.server is not None:
            await self.server.stop(self._remaining())
            self.server = None

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (see the module docstring); safe to call more than once."""
        grace = self.settings.grace_seconds if grace is None else grace
        stack, self._stack = self._stack, None
        if stack is None:
            return
        logger.info("shutting down: draining calls for up to %.1fs", grace)
        self._deadline = asyncio.get_running_loop().time() + grace
        await stack.aclose()
        logger.info("server stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
