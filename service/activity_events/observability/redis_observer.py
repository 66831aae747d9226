"""Redis work observed: a duration histogram and an error counter per command,
and a CLIENT span (``db.system=redis``, ``db.operation``) when a span is current.

:func:`instrument_redis` wraps a redis-py asyncio client's ``execute_command``
and ``pipeline``; the write path, which pipelines by hand, uses a
:class:`RedisObserver` directly (``timed`` / ``failed``, spans only when one
would record).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from activity_events.observability.tracing import tracer_of


def _command_name(args: tuple[Any, ...]) -> str:
    if not args:
        return "UNKNOWN"
    first = args[0]
    name = first.decode() if isinstance(first, bytes) else str(first)
    return name.split(" ", 1)[0].upper()


def _is_blocking(args: tuple[Any, ...]) -> bool:
    return any(
        (isinstance(a, str) and a.upper() == "BLOCK")
        or (isinstance(a, bytes) and a.upper() == b"BLOCK")
        for a in args[1:]
    )


class RedisObserver:
    """Times, counts and traces Redis work (see :func:`instrument_redis`).

    ``metrics`` (a :class:`~activity_events.observability.metrics.ServiceMetrics`,
    optional) gets ``activity_redis_command_duration_seconds{command}`` and
    ``activity_redis_command_errors_total{command,error}``. A CLIENT span
    (``db.system=redis``, ``db.operation``) is made only when a span is
    current, so RPCs get Redis children and background loops make none.
    """

    def __init__(self, metrics: Any = None, tracer_provider: trace.TracerProvider | None = None):
        self._metrics = metrics
        self._tracer = tracer_of(tracer_provider)
        self._durations: dict[str, Any] = {}

    @staticmethod
    def traces() -> bool:
        """True when Redis work started now would get a span (a recording span is current)."""
        parent = trace.get_current_span()
        return parent.get_span_context().is_valid and parent.is_recording()

    def timed(self, command: str, seconds: float) -> None:
        """Record the duration of Redis work done without :meth:`observe` (a hot
        path that times itself when :meth:`traces` is False)."""
        if self._metrics is None:
            return
        child = self._durations.get(command)
        if child is None:
            child = self._durations[command] = self._metrics.redis_command_duration.labels(command)
        child.observe(seconds)

    def failed(self, command: str, error: BaseException) -> None:
        """Count Redis work that failed (as :meth:`observe` does)."""
        if self._metrics is not None and not isinstance(error, asyncio.CancelledError):
            self._metrics.redis_command_errors.labels(command, type(error).__name__).inc()

    async def observe(
        self, command: str, run: Callable[[], Awaitable[Any]], *, blocking: bool = False
    ) -> Any:
        """Await ``run()`` as Redis work named ``command``. Blocking reads are not
        timed (their duration is the wait, not Redis' speed); errors still count."""
        metrics = self._metrics
        span = None
        if not blocking and self.traces():
            span = self._tracer.start_span(
                command,
                kind=SpanKind.CLIENT,
                attributes={"db.system": "redis", "db.operation": command},
            )
        started = time.perf_counter()
        try:
            result = await run()
        except BaseException as error:
            self.failed(command, error)
            if span is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            if metrics is not None and not blocking:
                self.timed(command, time.perf_counter() - started)
            if span is not None:
                span.end()
        return result


def instrument_redis(
    client: Any,
    metrics: Any = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> Any:
    """Observe every command and pipeline of a redis-py asyncio client; returns ``client``.

    Each command is observed by a :class:`RedisObserver` under its name, a
    pipeline once as ``PIPELINE``. Works for ``redis.asyncio.Redis`` and
    ``RedisCluster`` (it wraps this instance's ``execute_command`` and
    ``pipeline`` only).
    """
    observer = RedisObserver(metrics, tracer_provider)
    execute_command = client.execute_command
    make_pipeline = client.pipeline

    async def traced_execute_command(*args: Any, **options: Any) -> Any:
        return await observer.observe(
            _command_name(args),
            lambda: execute_command(*args, **options),
            blocking=_is_blocking(args),
        )

    def traced_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        execute = pipe.execute

        async def traced_execute(*e_args: Any, **e_kwargs: Any) -> Any:
            return await observer.observe("PIPELINE", lambda: execute(*e_args, **e_kwargs))

        pipe.execute = traced_execute
        return pipe

    client.execute_command = traced_execute_command
    client.pipeline = traced_pipeline
    return client
