"""Admission control: a budget of in-flight work per class of call, refused early.

Every call belongs to one class, and each class has its own budget, so that
one kind of traffic cannot starve another:

=========  ===============================================================  =======================
class      calls                                                             budget (setting)
=========  ===============================================================  =======================
writes     CreateEvent, CreateEvents                                         ``max_inflight_writes``
reads      history (ListEvents, WatchEvents without follow), listings,      ``max_inflight_reads``
           admin calls, the page's API
streams    long-lived: gRPC followers, page live streams (SSE),             ``max_streams`` in all,
           subscription consumers                                           and one per kind
health     grpc.health.v1 Check and Watch                                   ``max_inflight_health``
=========  ===============================================================  =======================

A call over budget is refused at once with RESOURCE_EXHAUSTED (an
:class:`~activity_events.domain.errors.Overloaded` whose message names the
setting), counted in ``activity_load_shed_total{class,reason}`` and logged at
most every :data:`LOG_EVERY_SECONDS` per class and reason. Nothing waits in a
queue here: a queue would only turn overload into timeouts.

Budgets are plain counters on the event loop: checking and taking a slot is
one synchronous step with no ``await`` in between, so N simultaneous opens
against a limit L admit exactly min(N, L).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from activity_events.domain.errors import Overloaded

if TYPE_CHECKING:
    from activity_events.app.settings import Settings
    from activity_events.observability.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 10.0
"""Shortest time between two log lines about refusals of one class and reason."""


class CallClass(enum.StrEnum):
    """The admission classes; the values are the ``class`` label of the metrics."""

    WRITES = "writes"
    READS = "reads"
    STREAMS = "streams"
    HEALTH = "health"


class StreamKind(enum.StrEnum):
    """Kinds of long-lived streams, each with a limit of its own within ``max_streams``."""

    FOLLOWERS = "followers"
    PAGE_STREAMS = "page_streams"
    CONSUMERS = "consumers"


@dataclass(slots=True)
class Budget:
    """A non-queueing limit: ``active`` slots of ``limit`` are taken."""

    name: str
    setting: str
    limit: int
    what: str
    """How a refusal describes what is exhausted ("writes in progress")."""
    active: int = 0
    idle: asyncio.Event | None = field(default=None, repr=False)

    def release(self) -> None:
        self.active -= 1
        if self.active == 0 and self.idle is not None:
            self.idle.set()


@dataclass(slots=True)
class StreamTicket:
    """The two slots a long-lived stream holds: its kind's and the total's."""

    kind: Budget
    total: Budget
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.kind.release()
            self.total.release()


class Turns:
    """How many messages the streams of one class may send per event-loop turn.

    Every call of the process shares one event loop, and a stream that sends
    as fast as its client reads would take as much of each turn as it can: a
    few full-history readers could leave writers a tenth of their rate. So
    streams of the reads and streams classes take a turn ticket before each
    message: ``per_turn`` of them per loop iteration, for all streams of the
    class together; the rest wait for the next iteration. With writers busy,
    iterations are long and reads get a small share of each; with writers
    idle, iterations are short and reads go as fast as ever.

    While ``contended()`` is false (no write in progress) tickets are not
    counted at all: with nobody to protect, streams are not slowed down
    (counting cost concurrent history readers a fifth of their rate).
    """

    __slots__ = ("_contended", "_granted", "_loop", "_scheduled", "_waiters", "per_turn")

    def __init__(self, per_turn: int, contended: Callable[[], bool] = lambda: True) -> None:
        self.per_turn = per_turn
        self._contended = contended
        self._loop: asyncio.AbstractEventLoop | None = None
        self._granted = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._scheduled = False

    async def take(self) -> None:
        """Wait for a ticket of this turn (at once while the turn has some left,
        and always while nothing contends)."""
        if not self._waiters and not self._contended():
            return
        if self._granted < self.per_turn and not self._waiters:
            self._granted += 1
            self._schedule()
            return
        waiter = self._running_loop().create_future()
        self._waiters.append(waiter)
        self._schedule()
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled():  # granted just as it was cancelled: pass it on
                self._granted -= 1
            raise

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: on Python 3.11 each lookup costs a system call.
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """A new loop iteration: hand this turn's tickets to the waiters first."""
        self._scheduled = False
        self._granted = 0
        waiters = self._waiters
        while waiters and self._granted < self.per_turn:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._granted += 1
        if waiters or self._granted:
            self._schedule()


class Admission:
    """The budgets of one server process; see the module docstring."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self._metrics = metrics
        self.classes: dict[CallClass, Budget] = {
            CallClass.WRITES: Budget(
                "writes", "max_inflight_writes", settings.max_inflight_writes,
                "writes in progress",
            ),
            CallClass.READS: Budget(
                "reads", "max_inflight_reads", settings.max_inflight_reads, "reads in progress"
            ),
            CallClass.STREAMS: Budget(
                "streams", "max_streams", settings.max_streams, "open streams"
            ),
            CallClass.HEALTH: Budget(
                "health", "max_inflight_health", settings.max_inflight_health,
                "health calls in progress",
            ),
        }  # fmt: skip
        self.kinds: dict[StreamKind, Budget] = {
            StreamKind.FOLLOWERS: Budget(
                "followers", "max_followers", settings.max_followers, "followers"
            ),
            StreamKind.PAGE_STREAMS: Budget(
                "page_streams", "max_page_streams", settings.max_page_streams,
                "live page streams",
            ),
            StreamKind.CONSUMERS: Budget(
                "consumers", "max_consumers", settings.max_consumers, "subscription consumers"
            ),
        }  # fmt: skip
        writes = self.classes[CallClass.WRITES]

        def writing() -> bool:
            return writes.active > 0

        self.turns: dict[CallClass, Turns] = {
            CallClass.READS: Turns(settings.reads_per_turn, writing),
            CallClass.STREAMS: Turns(settings.streams_per_turn, writing),
        }
        """Messages per event-loop turn for each class's streams while writes are
        in progress (see Turns)."""
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        if metrics is not None:
            for call_class, budget in self.classes.items():
                metrics.inflight.labels(call_class.value).set_function(_reader(budget))
                metrics.inflight_limit.labels(call_class.value).set(budget.limit)
            for kind, budget in self.kinds.items():
                metrics.streams_open.labels(kind.value).set_function(_reader(budget))
                metrics.streams_limit.labels(kind.value).set(budget.limit)
                metrics.load_shed.labels(CallClass.STREAMS.value, kind.value)
            for call_class in CallClass:
                metrics.load_shed.labels(call_class.value, "inflight")
            for call_class in (CallClass.WRITES, CallClass.READS, CallClass.STREAMS):
                metrics.load_shed.labels(call_class.value, "redis_pool")
            metrics.load_shed.labels(CallClass.STREAMS.value, "stalled")
            metrics.load_shed.labels(CallClass.STREAMS.value, "lagged")
            metrics.load_shed.labels(CallClass.READS.value, "stalled")

    # -- taking slots ------------------------------------------------------------

    def enter(self, call_class: CallClass) -> Budget:
        """Take a slot of ``call_class`` (release it with ``Budget.release``), or
        raise Overloaded at once."""
        budget = self.classes[call_class]
        if budget.active >= budget.limit:
            raise self.refuse(call_class, "inflight", _message(budget))
        budget.active += 1
        return budget

    def enter_stream(self, kind: StreamKind) -> StreamTicket:
        """Take a slot of the stream kind and of all streams together, or neither."""
        own = self.kinds[kind]
        total = self.classes[CallClass.STREAMS]
        if own.active >= own.limit:
            raise self.refuse(CallClass.STREAMS, kind.value, _message(own))
        if total.active >= total.limit:
            raise self.refuse(CallClass.STREAMS, "inflight", _message(total))
        own.active += 1
        total.active += 1
        return StreamTicket(own, total)

    # -- refusals ------------------------------------------------------------------

    def count(self, call_class: CallClass | str, reason: str) -> None:
        """Count a stream ended on purpose elsewhere (a follower that lagged)."""
        if self._metrics is not None:
            self._metrics.load_shed.labels(str(call_class), reason).inc()

    def refuse(self, call_class: CallClass | str, reason: str, message: str) -> Overloaded:
        """Count and (rate-limited) log a refusal; returns the error to raise."""
        name = str(call_class)
        if self._metrics is not None:
            self._metrics.load_shed.labels(name, reason).inc()
        key = (name, reason)
        now = time.monotonic()
        last, suppressed = self._logged.get(key, (0.0, 0))
        if now - last >= LOG_EVERY_SECONDS:
            extra = f" ({suppressed} more since the last report)" if suppressed else ""
            logger.warning(
                "shedding load: %s call refused: %s%s",
                name,
                message,
                extra,
                extra={"call_class": name, "reason": reason},
            )
            self._logged[key] = (now, 0)
        else:
            self._logged[key] = (last, suppressed + 1)
        return Overloaded(name, reason, message)

    # -- shutdown ----------------------------------------------------------------

    async def wait_idle(self, *classes: CallClass) -> None:
        """Return once no call of ``classes`` is in progress (callers bound the wait)."""
        for call_class in classes:
            budget = self.classes[call_class]
            if budget.active == 0:
                continue
            if budget.idle is None:
                budget.idle = asyncio.Event()
            budget.idle.clear()
            await budget.idle.wait()


def _message(budget: Budget) -> str:
    return (
        f"too many {budget.what} on this replica ({budget.setting}={budget.limit}); "
        "retry with backoff or on another replica"
    )


def _reader(budget: Budget) -> Callable[[], float]:
    return lambda: budget.active
