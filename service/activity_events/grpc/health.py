"""Real health: SERVING only while Redis answers and the server is not draining.

The standard aio health servicer holds the status of the overall service
("") and of activityevents.ActivityEvents; a probe flips both, so ``Check``
and ``Watch`` (and the HTTP /readyz) tell the truth. A third name,
``liveness``, says only that the process runs and is not shutting down, for
liveness probes.

The probe must judge Redis, not the load on this replica: it pings from a
thread of its own, with an event loop and a Redis connection of its own
(:class:`RedisProbe`), so it never waits behind user calls for a pooled
connection or behind a busy event loop. Health therefore stays SERVING under
any load while Redis answers, and turns NOT_SERVING within
``PROBE_INTERVAL + PROBE_TIMEOUT`` seconds when it does not. A call that sees
Redis fail pokes the probe to check at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from activity_events import SERVICE_NAME
from activity_events.grpc.admission import CallClass
from activity_events.grpc.pipeline import Policy
from activity_events.observability.logs import redact

logger = logging.getLogger(__name__)

SERVICES = ("", SERVICE_NAME)
"""Health names that follow Redis: SERVING only while Redis answers."""

LIVENESS = "liveness"
"""Health name for liveness probes: SERVING from start-up until shutdown,
whatever Redis does. Restarting pods cannot fix a Redis outage, so a
liveness probe must not fail because of one (the chart probes this name)."""
PROBE_INTERVAL = 0.5
"""Seconds between Redis pings while healthy."""
PROBE_TIMEOUT = 1.0
"""A ping not answered within this many seconds counts as a failure."""
PROBE_BACKOFF_MAX = 1.0
"""Longest wait between pings while Redis is down: one connection attempt a
second costs Redis nothing, and readiness comes back within a second of Redis."""

POLICIES: dict[str, Policy] = {
    "Check": Policy(CallClass.HEALTH, role=None, quiet=True),
    "Watch": Policy(CallClass.HEALTH, role=None, quiet=True),
}
"""Health is open (probes carry no tokens), has its own budget, and is quiet."""


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


class RedisProbe:
    """Pings Redis every PROBE_INTERVAL from a thread with its own event loop and
    connection (made by ``connect`` in that thread), reporting each verdict
    with ``report(ok, reason)`` (called in the probe's thread)."""

    def __init__(
        self,
        connect: Callable[[], aioredis.Redis],
        report: Callable[[bool, str], None],
        *,
        interval: float = PROBE_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._connect = connect
        self._report = report
        self.interval = interval
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="redis-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5.0)

    def poke(self) -> None:
        """Probe now rather than at the next interval (thread-safe)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.poke()
        self._thread.join(timeout)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._run(loop))
        finally:
            loop.close()

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = asyncio.Event()
        self._loop = loop
        self._started.set()
        client = self._connect()
        delay = self.interval
        try:
            while not self._stopping:
                ok, reason = await self._ping(client)
                self._report(ok, reason)
                delay = self.interval if ok else min(PROBE_BACKOFF_MAX, delay * 2)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _ping(self, client: aioredis.Redis) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(self.timeout):
                await client.ping()
        except TimeoutError:
            return False, f"redis did not answer within {self.timeout:g}s"
        except Exception as error:
            text = str(error).split("\n", 1)[0][:160]
            return False, redact(f"redis unavailable: {type(error).__name__}: {text}")
        return True, ""


class HealthMonitor:
    """Publishes the probe's verdicts to the health servicer (and /readyz)."""

    def __init__(
        self,
        connect: Callable[[], aioredis.Redis],
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.servicer = _HealthServicer()
        self._on_change = on_change
        self._probe = RedisProbe(connect, self._report)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first = asyncio.Event()
        self._updates: set[asyncio.Task[None]] = set()
        self.serving = False
        self.shutting_down = False
        self.reason = ""
        """Why the last probe failed (redacted, one line), for logs."""

    def poke(self) -> None:
        """Probe now (a call just saw Redis fail)."""
        self._probe.poke()

    def _report(self, ok: bool, reason: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._verdict, ok, reason)

    def _verdict(self, ok: bool, reason: str) -> None:
        self.reason = reason
        self._first.set()
        if self.shutting_down or ok == self.serving:
            return
        task = asyncio.create_task(self._set(ok))
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)

    async def _set(self, serving: bool) -> None:
        if serving == self.serving or self.shutting_down:
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

    async def start(self) -> None:
        """Publish NOT_SERVING for both names, start probing, and wait (bounded)
        for the first verdict."""
        self._loop = asyncio.get_running_loop()
        for name in SERVICES:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self._probe.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PROBE_TIMEOUT + 1.0):
                await self._first.wait()
        for task in list(self._updates):
            await task

    async def shutdown(self) -> None:
        """NOT_SERVING for good: Watch streams see it before the server drains."""
        self.shutting_down = True
        self.serving = False
        await self.servicer.enter_graceful_shutdown()
        await asyncio.to_thread(self._probe.stop)
