"""Assembly and lifecycle of the server process (``activity-server``).

Start: settings -> logs -> Redis (embedded when no URL) -> store, hub, health
-> gRPC server -> SERVING once Redis answers. SIGTERM/SIGINT: health
NOT_SERVING (Watch streams see it) -> followers' streams end -> in-flight calls
drain for ``grace_seconds`` -> connections closed -> exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydantic_settings import SettingsError

from activity_events import SERVICE_NAME, __version__
from activity_events.app.embedded import EmbeddedRedis
from activity_events.app.settings import Settings, redact_url
from activity_events.grpc import auth, tls
from activity_events.grpc.events import ActivityEventsServicer, generic_handler
from activity_events.grpc.health import HealthMonitor
from activity_events.grpc.subscriptions import SUBSCRIPTIONS_SERVICE, SubscriptionsServicer
from activity_events.grpc.subscriptions import generic_handler as subscriptions_handler
from activity_events.http.page import ActivityPage, start_page
from activity_events.http.server import MetricsServer
from activity_events.live.hub import BlockingReader, Hub, NotifiedReader, Reader
from activity_events.observability import logs
from activity_events.observability.grpc_metrics import AccessLogInterceptor, GrpcMetricsInterceptor
from activity_events.observability.metrics import ServiceMetrics
from activity_events.observability.tracing import (
    TracingInterceptor,
    configure_tracing,
    instrument_redis,
    shutdown_tracing,
)
from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis import connection
from activity_events.redis.store import EventStore

logger = logging.getLogger(__name__)

REFLECTED = (
    SERVICE_NAME,
    SUBSCRIPTIONS_SERVICE,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """gRPC core options, each deliberate (see DESIGN.md's pitfalls)."""
    options: list[tuple[str, Any]] = [
        # A second process on the same port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
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
    """One server process: store, hub, health and the gRPC server, started and
    stopped in order. ``registry`` receives the metrics (tests pass a fresh one)."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.port = 0
        self.embedded: EmbeddedRedis | None = None
        self.store: EventStore | None = None
        self.hub: Hub | None = None
        self.health: HealthMonitor | None = None
        self.servicer: ActivityEventsServicer | None = None
        self.subscriptions: SubscriptionsServicer | None = None
        self.server: grpc.aio.Server | None = None
        # Observability: service metrics and the HTTP side port (/metrics, /healthz, /readyz).
        self.metrics = ServiceMetrics(self.registry)
        self.http: MetricsServer | None = None
        self.page: ActivityPage | None = None
        self.metrics_port = 0

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        """Metrics outermost (times everything), then the span, then the access log
        (written inside the span, so it carries the trace id)."""
        services = [
            *pb.DESCRIPTOR.services_by_name.values(),  # ActivityEvents, Subscriptions
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        ]
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [
            GrpcMetricsInterceptor(self.registry, services),
            TracingInterceptor(),
            AccessLogInterceptor(),
        ]
        # Auth innermost, so refused calls are still counted and access-logged.
        checker = auth.interceptor(
            self.settings.auth_tokens_file, reflection=self.settings.auth_reflection
        )
        return interceptors if checker is None else [*interceptors, checker]

    def _ready(self) -> bool:
        """/readyz: Redis reachable and not shutting down."""
        return self.health is not None and self.health.serving and not self.health.shutting_down

    async def start(self) -> None:
        settings = self.settings
        if settings.redis_url is None:
            self.embedded = EmbeddedRedis(settings.data_dir)
            await self.embedded.start()
            url = self.embedded.url
        else:
            url = settings.redis_url.get_secret_value()
        target = connection.parse(url)
        logger.info("using redis (%s) at %s", target.mode, redact_url(url))
        client = connection.connect(
            settings,
            url,
            max_connections=settings.redis_max_connections,
            socket_timeout=settings.redis_timeout_seconds,
        )
        # The hub's own connection blocks for hub_block_ms; its socket timeout
        # must be longer, or redis-py would report an idle stream as an error.
        hub_client = connection.connect(
            settings,
            url,
            max_connections=1,
            socket_timeout=settings.hub_block_ms / 1000 + settings.redis_timeout_seconds + 1,
        )
        metrics = self.metrics
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
        self.store = EventStore(client, settings, cluster=target.cluster)
        for store_client in self.store.clients:
            instrument_redis(store_client, metrics)
        self.hub = Hub(
            reader,
            self.store,
            block_ms=settings.hub_block_ms,
            queue_size=settings.follower_queue,
            on_delivery=lambda event: metrics.observe_hub_lag(event.cursor.entry_id),
        )
        hub = self.hub
        metrics.followers.set_function(lambda: hub.follower_count)
        self.health = HealthMonitor(
            self.store, on_change=lambda up: metrics.redis_up.set(1 if up else 0)
        )
        self.servicer = ActivityEventsServicer(self.store, self.hub, settings, metrics)
        self.subscriptions = SubscriptionsServicer(self.store, self.hub, settings, self.registry)

        server = grpc.aio.server(
            interceptors=self._interceptors(), options=server_options(settings)
        )
        server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        server.add_generic_rpc_handlers((subscriptions_handler(self.subscriptions),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        if settings.reflection:
            reflection.enable_server_reflection(REFLECTED, server)
        address = f"{settings.host}:{settings.port}"
        self.port = tls.add_port(server, address, settings)  # plaintext unless TLS is set
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        self.server = server
        await self.health.start()
        self.http = MetricsServer(
            self.registry, settings.metrics_host, settings.metrics_port, readiness=self._ready
        )
        await self.http.start()
        self.metrics_port = self.http.port
        self.page = await start_page(settings, self.store, self.hub, self.http)
        self.hub.start()
        await server.start()
        logger.info("Server has been started on %d", self.port)
        if not self.health.serving:
            logger.warning(
                "redis is not reachable yet (%s); serving NOT_SERVING until it is",
                self.health.reason or "no answer",
            )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop; safe to call more than once and after a failed start."""
        grace = self.settings.grace_seconds if grace is None else grace
        logger.info("shutting down: draining calls for up to %.1fs", grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.health is not None:
            await self.health.shutdown()
        if self.servicer is not None:
            # New calls are refused with UNAVAILABLE (retry elsewhere) rather
            # than cut off with CANCELLED once the gRPC server stops accepting.
            self.servicer.draining = True
        if self.page is not None:
            await self.page.stop()
            self.page = None
        if self.hub is not None:
            await self.hub.stop()
        if self.servicer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self.servicer.unary_limit.wait_idle()
        if self.server is not None:
            await self.server.stop(max(0.0, deadline - loop.time()))
            self.server = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.store is not None:
            await self.store.redis.aclose()
            self.store = None
        if self.embedded is not None:
            await self.embedded.stop()
            self.embedded = None
        logger.info("server stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then stop gracefully. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tracer_provider = configure_tracing()
    app = Application(settings)
    try:
        try:
            await app.start()
        except Exception as exc:
            logger.error("start-up failed: %s", exc)
            await app.stop(0)
            return 1
        await stop.wait()
        await app.stop()
        return 0
    finally:
        shutdown_tracing(tracer_provider)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="activity-server",
        description="Serve activityevents.ActivityEvents over gRPC. Configured by environment "
        "variables (ACTIVITY_*, and PORT for the gRPC port); see the README's settings table.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"activity-server: invalid setting {where}: {error['msg']}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # e.g. Consul unreachable without ACTIVITY_CONSUL_FALLBACK
        print(f"activity-server: {logs.redact(str(exc))}", file=sys.stderr)
        return 2
    secrets = [
        s.get_secret_value()
        for s in (settings.redis_url, settings.redis_password, settings.consul_http_token)
        if s is not None
    ]
    logs.configure(settings.log_level, secrets=secrets)
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional speed-up

        return uvloop.run(serve(settings))
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
