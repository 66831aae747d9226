"""Real health: SERVING only while Redis answers and the server is not draining.

The standard aio health servicer holds the status of the overall service
("") and of activityevents.ActivityEvents; a monitor task pings Redis and
flips both, so ``Check`` and ``Watch`` (and the HTTP /readyz) tell the truth.
A third name, ``liveness``, says only that the process runs and is not
shutting down, for liveness probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from activity_events import SERVICE_NAME
from activity_events.domain.errors import StoreUnavailable
from activity_events.redis.store import EventStore

logger = logging.getLogger(__name__)

SERVICES = ("", SERVICE_NAME)
"""Health names that follow Redis: SERVING only while Redis answers."""

LIVENESS = "liveness"
"""Health name for liveness probes: SERVING from start-up until shutdown,
whatever Redis does. Restarting pods cannot fix a Redis outage, so a
liveness probe must not fail because of one (the chart probes this name)."""
PROBE_INTERVAL = 0.5
"""Seconds between Redis pings while healthy."""
BACKOFF_MAX = 5.0
"""Longest wait between pings while Redis is down."""


class _HealthServicer(HealthServicer):  # type: ignore[misc]
    """The standard aio health servicer, with a Watch that ends after it has
    sent the final NOT_SERVING of a graceful shutdown.

    The stock Watch never returns, so every client using gRPC client-side
    health checking (which holds a Watch open) would make ``server.stop(grace)``
    wait the whole grace period on every rollout. It is also an async
    generator rather than ``context.write`` based, like every streaming
    handler here, so interceptors see its messages.
    """

    async def Watch(  # type: ignore[override]
        self, request: health_pb2.HealthCheckRequest, context: object
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    )
                    if status != last:
                        yield health_pb2.HealthCheckResponse(status=status)
                        last = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]


class HealthMonitor:
    def __init__(self, store: EventStore, on_change: Callable[[bool], None] | None = None) -> None:
        self.servicer = _HealthServicer()
        self._store = store
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        self.serving = False
        self.shutting_down = False
        self.reason = ""
        """Why the last probe failed (redacted, one line), for logs."""
        store.on_failure = self.poke

    def poke(self) -> None:
        """Probe now (a call just saw Redis fail)."""
        self._poke.set()

    async def _set(self, serving: bool) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in SERVICES:
            await self.servicer.set(name, status)
        if serving:
            logger.info("redis reachable; health SERVING")
        else:
            logger.warning("%s; health NOT_SERVING", self.reason or "redis unreachable")
        if self._on_change is not None:
            self._on_change(serving)

    async def probe(self) -> bool:
        try:
            await self._store.ping()
        except StoreUnavailable as error:
            self.reason = str(error)
            return False
        self.reason = ""
        return True

    async def start(self) -> None:
        """Publish NOT_SERVING for both names, then the first probe's verdict."""
        for name in SERVICES:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._set(await self.probe())
        self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def _run(self) -> None:
        delay = PROBE_INTERVAL
        while not self.shutting_down:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._poke.wait()
            self._poke.clear()
            if self.shutting_down:
                return
            ok = await self.probe()
            await self._set(ok)
            delay = PROBE_INTERVAL if ok else min(BACKOFF_MAX, max(PROBE_INTERVAL, delay * 2))

    async def shutdown(self) -> None:
        """NOT_SERVING for good: Watch streams see it before the server drains."""
        self.shutting_down = True
        self.serving = False
        await self.servicer.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
