"""Redis connections per admission class ("lanes"), each with two separate bounds.

Writes, reads and streams each get a client of their own with a fixed number
of connections (``redis_write_connections``, ``redis_read_connections``,
``redis_stream_connections``), so a storm of history reads can occupy every
read connection and a create still finds a write connection free. Health
probes and the follower hub have connections of their own besides these.

A command goes through two bounds, never one:

1. **the wait for a connection of the lane**, at most
   ``redis_pool_wait_seconds``. Past it the call is refused with
   RESOURCE_EXHAUSTED (an :class:`Overloaded` naming the lane's setting):
   the lane is busy, Redis is not the problem.
2. **the command itself**, at most ``redis_timeout_seconds`` once it holds a
   connection. Past it the call fails UNAVAILABLE: Redis did not answer.

Which lane a call uses is the ambient :data:`current` lane, set by the call
pipeline (and the HTTP side) from the call's class, so store code stays free
of plumbing and every Redis command of a call, wherever it is issued, counts
against that call's lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from hiredis import pack_command
from redis import exceptions as rexc

from activity_events.domain.errors import ActivityError, Overloaded, StoreUnavailable

if TYPE_CHECKING:
    from activity_events.observability.redis_observer import RedisObserver

logger = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_DOWN = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.ReadOnlyError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    OSError,
    TimeoutError,
)
"""Redis failures that mean "not reachable right now": the call is retryable."""

Work = Callable[[aioredis.Redis], Awaitable[T]]
"""What a lane runs: a function of the lane's client that issues the commands."""


class Lane:
    """One class's Redis client, its connection slots and its two bounds (module doc).

    ``raw`` shares the client's connections but leaves XRANGE replies as
    hiredis parsed them (nested lists of bytes), for the history hot path;
    it is None on Cluster, whose client normalises replies itself.
    ``refuse`` builds (and counts) the error for a lane that stayed busy.
    """

    def __init__(
        self,
        name: str,
        client: aioredis.Redis,
        connections: int,
        *,
        setting: str,
        timeout: float,
        pool_wait: float,
        raw: aioredis.Redis | None = None,
        refuse: Callable[[str, str, str], Overloaded] | None = None,
        observer: RedisObserver | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.raw = raw
        self.connections = connections
        self.setting = setting
        self.timeout = timeout
        self.pool_wait = pool_wait
        self._slots = asyncio.Semaphore(connections)
        self._refuse = refuse
        self._observer = observer
        self.direct = getattr(client, "connection_pool", None) is not None
        """:meth:`send` speaks to connections of its own (not on Cluster)."""
        self._idle: list[Any] = []
        """Connections of :meth:`send`, idle. Never more than ``connections``: each
        is used under one of the lane's slots."""
        self.on_failure: Callable[[], None] | None = None
        """Called when Redis failed or did not answer (health probes at once)."""
        self._abandoned: set[asyncio.Future[Any]] = set()

    @property
    def busy(self) -> int:
        """Connections of the lane in use now (abandoned commands included)."""
        return self.connections - self._slots._value

    async def run(self, work: Work[T], *, raw: bool = False) -> T:
        """Run ``work(client)`` within the lane's bounds; errors become domain errors.

        The command runs in a task of its own and the caller waits at most
        the timeout for it: cancelling a redis-py call tears its connection
        down, and against a Redis that is alive but not answering (paused,
        partitioned) that teardown can itself hang, so the caller must not
        wait for it. An abandoned command keeps its connection slot until it
        unwinds, so a stuck Redis cannot be flooded with new connections.
        """
        await self._take_slot()
        client = self.raw if raw and self.raw is not None else self.client
        try:
            coroutine = work(client)
            task = asyncio.ensure_future(coroutine)
        except BaseException:
            self._slots.release()
            raise
        task.add_done_callback(self._done)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            self._abandoned.add(task)
            self._failed()
            raise StoreUnavailable(f"redis did not answer within {self.timeout:g}s")
        try:
            return task.result()
        except BaseException as error:
            raise self._translate(error) from None

    async def run_sends(self, work: Callable[[], Awaitable[T]]) -> T:
        """Like :meth:`run`, for work that only uses :meth:`send`: where that
        speaks to connections of its own, whose teardown never waits, the work
        runs in the caller's task under a plain timeout, which costs a fraction
        of a task of its own (the write path does this for every batch)."""
        if not self.direct:
            return await self.run(lambda _: work())
        await self._take_slot()
        try:
            async with asyncio.timeout(self.timeout):
                return await work()
        except TimeoutError:
            self._failed()
            raise StoreUnavailable(f"redis did not answer within {self.timeout:g}s") from None
        except (ActivityError, asyncio.CancelledError):
            raise
        except Exception as error:
            raise self._translate(error) from None
        finally:
            self._slots.release()

    async def send(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send raw commands in one round trip and read their replies, in order;
        error replies come back as exception objects for the caller to judge.

        Call it from work run by :meth:`run` or :meth:`run_sends` (which hold
        a slot and bound the time). It speaks to a connection of the lane's
        own, packing with hiredis, and skips redis-py's pipeline, retry and
        pool layers, which cost several times the round trip itself; the
        write path sends every create through it. On Cluster, where slots
        decide the node, it is a redis-py pipeline.
        """
        observer = self._observer
        if observer is None:
            return await self._send(commands)
        if observer.traces():
            return list(await observer.observe("PIPELINE", lambda: self._send(commands)))
        started = time.perf_counter()
        try:
            replies = await self._send(commands)
        except BaseException as error:
            observer.failed("PIPELINE", error)
            raise
        observer.timed("PIPELINE", time.perf_counter() - started)
        return replies

    async def load_script(self, source: str) -> None:
        """SCRIPT LOAD on every node the lane's commands may reach."""
        await self.client.script_load(source)

    async def _send(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        pool = getattr(self.client, "connection_pool", None)
        if pool is None:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
        packed = b"".join([pack_command(tuple(command)) for command in commands])
        connection = self._idle.pop() if self._idle else self._connection(pool)
        healthy = False
        try:
            for attempt in (1, 2):
                try:
                    if not connection.is_connected:
                        await connection.connect()
                    elif await connection.can_read():
                        # Data or EOF on an idle connection: Redis restarted or
                        # failed over since it was last used.
                        raise rexc.ConnectionError("idle connection went stale")
                    await connection.send_packed_command(packed, check_health=False)
                    break
                except (rexc.ConnectionError, OSError):
                    # Nothing was sent, so one retry on a fresh connection is safe.
                    await connection.disconnect(nowait=True)
                    if attempt == 2:
                        raise
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except rexc.ResponseError as error:
                    replies.append(error)
            healthy = True
            return replies
        finally:
            if not healthy:
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)
            self._idle.append(connection)

    @staticmethod
    def _connection(pool: Any) -> Any:
        """A connection like the pool's, but without a socket timeout: :meth:`run`
        bounds the time already, and redis-py wraps every send of a connection
        that has one in a task of its own (``asyncio.wait_for``)."""
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        return pool.connection_class(**kwargs)

    async def _take_slot(self) -> None:
        slots = self._slots
        if not slots.locked():
            await slots.acquire()  # free: returns without suspending
            return
        try:
            async with asyncio.timeout(self.pool_wait):
                await slots.acquire()
        except TimeoutError:
            message = (
                f"no redis connection of the {self.name} lane came free within "
                f"{self.pool_wait:g}s ({self.setting}={self.connections}); retry with backoff"
            )
            if self._refuse is not None:
                raise self._refuse(self.name, "redis_pool", message) from None
            raise Overloaded(self.name, "redis_pool", message) from None

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._slots.release()
        if task in self._abandoned:
            self._abandoned.discard(task)
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not report it as lost

    def _failed(self) -> None:
        if self.on_failure is not None:
            self.on_failure()

    def _translate(self, error: BaseException) -> BaseException:
        if isinstance(error, rexc.AuthenticationError):  # a ConnectionError: must come first
            self._failed()
            return StoreUnavailable(
                "redis rejected the credentials (check the password or ACL user)"
            )
        if isinstance(error, rexc.ResponseError):
            text = str(error).split("\n", 1)[0][:200]
            self._failed()
            if "NOPERM" in text or "NOAUTH" in text:
                return StoreUnavailable(f"redis refused the credentials: {text[:120]}")
            # OOM, MISCONF, READONLY and friends: the store cannot take the call now.
            return StoreUnavailable(f"redis refused the command: {text}")
        if isinstance(error, REDIS_DOWN):
            self._failed()
            return StoreUnavailable(f"redis unavailable: {type(error).__name__}")
        return error

    async def aclose(self) -> None:
        for connection in self._idle:
            with contextlib.suppress(Exception):
                await connection.disconnect()
        self._idle.clear()
        await self.client.aclose()


class Lanes:
    """The three lanes of a server process, and which one the current call uses."""

    def __init__(self, writes: Lane, reads: Lane, streams: Lane) -> None:
        self.writes = writes
        self.reads = reads
        self.streams = streams
        self.by_class = {"writes": writes, "reads": reads, "streams": streams}

    def __iter__(self) -> Any:
        return iter((self.writes, self.reads, self.streams))

    def current(self) -> Lane:
        """The lane of the call being served (reads outside any call)."""
        return self.by_class.get(current.get(), self.reads)

    async def aclose(self) -> None:
        for lane in self:
            await lane.aclose()


current: contextvars.ContextVar[str] = contextvars.ContextVar("redis_lane", default="reads")
"""Name of the lane ("writes", "reads" or "streams") of the call being served."""


def use(call_class: str) -> contextvars.Token[str]:
    """Make ``call_class``'s lane current (for this task and tasks it creates)."""
    return current.set(call_class)
