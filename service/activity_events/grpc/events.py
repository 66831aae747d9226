"""The ActivityEvents service: validate, call the store and the hub, shape responses.

Its handlers contain only what the methods do: auth, admission, parsing,
deadlines, error statuses, metrics, logs and traces are the call pipeline's
(:mod:`activity_events.grpc.pipeline`), configured by :data:`POLICIES`. It
knows no Redis commands. Streaming handlers are async generators, and the
history streams yield bytes assembled by :mod:`activity_events.codec.wire`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from activity_events.codec import wire
from activity_events.codec.wire import Row
from activity_events.domain.errors import Conflict, Exhausted, FollowerLagged, InvalidArgument
from activity_events.domain.events import (
    Cursor,
    StoredEvent,
    validate_deployment_id,
    validate_new,
)
from activity_events.domain.limits import ALL, DEFAULT_PAGE, MAX_PAGE, MAX_RESPONSE_BYTES
from activity_events.grpc.admission import CallClass, StreamKind
from activity_events.grpc.pipeline import Admit, Policy, note_cursor
from activity_events.live.hub import Follower, Hub, last_cursor
from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis.merge import history_all
from activity_events.redis.store import AppendResult, EventStore, Outcome

if TYPE_CHECKING:
    from activity_events.app.settings import Settings
    from activity_events.observability.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=StoredEvent)

MAX_CATCHUPS = 5
"""Times a follower whose live events overflowed while it read history re-reads
from Redis before it is treated as unable to keep up."""

_OUTCOMES = {
    Outcome.CREATED: pb.OUTCOME_CREATED,
    Outcome.DUPLICATE: pb.OUTCOME_DUPLICATE,
    Outcome.CONFLICT: pb.OUTCOME_CONFLICT,
    Outcome.EXHAUSTED: pb.OUTCOME_INVALID,
}


def watch_admission(request: pb.WatchEventsRequest) -> Admit:
    """WatchEvents is a follower (a long-lived stream) only with ``follow``;
    otherwise it is a history read."""
    return StreamKind.FOLLOWERS if request.follow else CallClass.READS


POLICIES: dict[str, Policy] = {
    "CreateEvent": Policy(CallClass.WRITES, "writer"),
    "CreateEvents": Policy(CallClass.WRITES, "writer"),
    "ListEvents": Policy(CallClass.READS, "reader"),
    "WatchEvents": Policy(watch_admission, "reader"),
    "ListDeployments": Policy(CallClass.READS, "reader"),
    "DeleteDeployment": Policy(CallClass.READS, "admin"),
}
"""How the pipeline admits and authorises each method (see Policy)."""


class ActivityEventsService:
    """Implements the six RPCs of activityevents.ActivityEvents."""

    def __init__(
        self,
        store: EventStore,
        hub: Hub,
        settings: Settings,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._settings = settings
        self._metrics = metrics
        self._counters = (
            {
                Outcome.CREATED: metrics.events_appended,
                Outcome.DUPLICATE: metrics.events_duplicates,
                Outcome.CONFLICT: metrics.events_conflicts,
                Outcome.EXHAUSTED: metrics.events_invalid,
            }
            if metrics is not None
            else {}
        )
        self._buffer = settings.stream_buffer_bytes
        self._max_message = min(MAX_RESPONSE_BYTES, max(4096, self._buffer // 2))

    def _count(self, results: Iterable[AppendResult] | AppendResult, invalid: int = 0) -> None:
        """Event outcomes into the service metrics (EXHAUSTED is answered as INVALID)."""
        metrics = self._metrics
        if metrics is None:
            return
        if isinstance(results, AppendResult):  # one create: the common case, no Counter
            counter = self._counters[results.outcome]
            counter.inc()
            return
        outcomes = Counter(result.outcome for result in results)
        metrics.record_outcomes(
            created=outcomes[Outcome.CREATED],
            duplicates=outcomes[Outcome.DUPLICATE],
            conflicts=outcomes[Outcome.CONFLICT],
            invalid=invalid + outcomes[Outcome.EXHAUSTED],
        )

    # -- legacy RPCs ---------------------------------------------------------------

    async def CreateEvent(self, request: pb.EventRequest, context: Any) -> pb.EventResponse:
        try:
            new = validate_new(request, max_message_bytes=self._settings.max_message_bytes)
        except InvalidArgument:
            self._count((), invalid=1)
            raise
        receive = time.time_ns()
        result = await self._store.append_one(new, receive)
        self._count(result)
        if result.outcome is Outcome.CONFLICT:
            raise Conflict(
                f"id: event {request.id} of deployment {request.deployment_id} already exists "
                f"with a different message (cursor {result.cursor})"
            )
        if result.outcome is Outcome.EXHAUSTED:
            raise Exhausted(f"id: deployment {request.deployment_id} has no free event id left")
        return pb.EventResponse(
            id=result.event_id,
            success=True,
            execution_time=new.execution_ms(receive),
            duplicate=result.outcome is Outcome.DUPLICATE,
            cursor=result.cursor_bytes.decode(),
        )

    async def ListEvents(self, request: pb.Deployment, context: Any) -> AsyncIterator[bytes]:
        deployment = validate_deployment_id(request.id, field="id", allow_all=True)
        if deployment == ALL:
            async for page in history_all(
                self._store, None, self._buffer, self._settings.page_size
            ):
                for event in page:
                    yield event.payload
            return
        async for rows in self._store.history_rows(deployment, None, None, self._buffer):
            for _, payload in rows:
                yield payload

    # -- new RPCs ------------------------------------------------------------------

    async def CreateEvents(
        self, request: pb.CreateEventsRequest, context: Any
    ) -> pb.CreateEventsResponse:
        if len(request.events) > self._settings.max_batch:
            raise InvalidArgument(
                "events",
                f"{len(request.events)} events; at most {self._settings.max_batch} per call",
            )
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(request.events))
        response = pb.CreateEventsResponse()
        results = response.results
        valid = []
        where = []
        limit = self._settings.max_message_bytes
        for index, event in enumerate(request.events):
            try:
                valid.append(validate_new(event, max_message_bytes=limit))
                where.append(index)
                results.add(index=index)  # filled in once stored
            except InvalidArgument as error:
                results.add(
                    index=index,
                    id=event.id,
                    deployment_id=event.deployment_id,
                    outcome=pb.OUTCOME_INVALID,
                    reason=str(error),
                )
        if valid:
            receive = time.time_ns()
            stored = await self._store.append(valid, receive)
            self._count(stored)
            for index, new, result in zip(where, valid, stored, strict=True):
                _fill_result(results[index], new.event_id, result, receive)
        self._count((), invalid=len(results) - len(valid))
        return response

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[bytes]:
        deployment = validate_deployment_id(request.deployment_id, allow_all=True)
        if request.limit < 0:
            raise InvalidArgument("limit", f"must be >= 0 (0 means no limit), got {request.limit}")
        after = Cursor.parse(request.after, deployment_id=deployment) if request.after else None
        if after is not None:
            if deployment == ALL:
                await self._store.check_cursor_all(after)
            else:
                await self._store.check_cursor(after)
        follower = await self._hub.subscribe(deployment) if request.follow else None
        watch = _Watch(deployment, after, request.limit or None)
        try:
            async for message in self._history(watch, follower):
                yield message
            if follower is None or watch.done:
                return
            yield wire.CAUGHT_UP
            async for message in self._live(watch, follower):
                yield message
        except FollowerLagged:
            if self._metrics is not None:
                self._metrics.follower_overflows.inc()
            raise
        finally:
            if follower is not None:
                follower.close()

    async def _history(self, watch: _Watch, follower: Follower | None) -> AsyncIterator[bytes]:
        """History after the watch's cursor; for a follower, again from where it got
        to when live events overflowed its log meanwhile (at most MAX_CATCHUPS times)."""
        position = watch.after
        for attempt in range(MAX_CATCHUPS):
            if watch.deployment == ALL:
                pages = history_all(self._store, position, self._buffer, self._settings.page_size)
                async for merged in pages:
                    fresh = watch.fresh(merged)
                    pieces = (wire.watch_piece(event) for event in fresh)
                    for message, end in wire.chunk_ends(pieces, self._max_message):
                        note_cursor(str(fresh[end - 1].cursor))
                        yield message
                    if watch.done:
                        return
            else:
                # One deployment: pages are strictly after `position` and in
                # order, so they go out as wire bytes with no per-event objects.
                prefix = f"{watch.deployment}:".encode()
                rows_pages = self._store.history_rows(
                    watch.deployment, position, watch.remaining, self._buffer
                )
                async for rows in rows_pages:
                    watch.sent_rows(rows)
                    for message, end in wire.watch_responses_rows(prefix, rows, self._max_message):
                        note_cursor((prefix + rows[end - 1][0]).decode())
                        yield message
                    if watch.done:
                        return
            if follower is None or not follower.lagged:
                return
            if attempt == MAX_CATCHUPS - 1:
                raise FollowerLagged(watch.resume_hint())
            # Live events overflowed while history was read: catch up from Redis.
            follower.reset()
            position = watch.last

    async def _live(self, watch: _Watch, follower: Follower) -> AsyncIterator[bytes]:
        """Live events as the hub appends them. Live events may repeat what history
        sent (the hub may append an event history already read, even after history
        ended), and a limit counts events: such batches are looked at event by
        event. Once a batch of one deployment starts after everything sent, every
        later batch does too (a deployment's events reach its log in order), and
        they go out as slices of the log's shared encodings, whatever their size.
        For all deployments (whose log interleaves streams) every batch is looked at."""
        page_size = self._settings.page_size
        overlapping = True
        while not self._hub.stopping:
            batch = await follower.next_batch(watch.resume_hint(), page_size)
            if not batch:
                continue
            if overlapping and watch.deployment != ALL:
                overlapping = not batch.starts_after(watch.seen)  # seen holds ``after``
            if not overlapping and watch.remaining is None:
                watch.sent_live(batch.run_lasts())
                for message, last in batch.messages(wire.watch_piece, self._max_message):
                    note_cursor(str(last.cursor))
                    yield message
            else:
                fresh = watch.fresh(batch.events())
                pieces = (event.encoded(wire.watch_piece) for event in fresh)
                for message, end in wire.chunk_ends(pieces, self._max_message):
                    note_cursor(str(fresh[end - 1].cursor))
                    yield message
            if watch.done:
                return

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: Any
    ) -> pb.ListDeploymentsResponse:
        size = request.page_size or DEFAULT_PAGE
        if not 0 < size <= MAX_PAGE:
            raise InvalidArgument(
                "page_size", f"must be between 0 and {MAX_PAGE}, got {request.page_size}"
            )
        start = _decode_token(request.page_token) if request.page_token else 0
        ids = await self._store.deployment_ids(start, size + 1)
        more = len(ids) > size
        ids = ids[:size]
        summaries = await self._store.summaries(ids)
        response = pb.ListDeploymentsResponse(
            next_page_token=_encode_token(ids[-1]) if more else ""
        )
        for summary in summaries:
            info = response.deployments.add(
                id=summary.deployment_id, event_count=summary.event_count
            )
            if summary.first is not None:
                info.first_receive = summary.first.decode().timestamp.receive
            if summary.last is not None:
                info.last_receive = summary.last.decode().timestamp.receive
                info.last_event.CopyFrom(summary.last.to_proto())
        return response

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: Any
    ) -> pb.DeleteDeploymentResponse:
        deployment = validate_deployment_id(request.deployment_id, allow_all=False)
        removed = await self._store.delete(deployment)
        if self._metrics is not None:
            self._metrics.events_deleted.inc(removed)
        logger.info("deployment %d deleted with %d events", deployment, removed)
        return pb.DeleteDeploymentResponse(deleted_events=removed)


class _Watch:
    """What one WatchEvents call has sent: the newest cursor per deployment (so
    live events the history already covered are dropped) and how many more
    events the limit allows."""

    __slots__ = ("after", "deployment", "floor", "remaining", "seen")

    def __init__(self, deployment: int, after: Cursor | None, limit: int | None) -> None:
        self.deployment = deployment
        self.after = after
        self.seen: dict[int, Cursor] = {}
        if after is not None and deployment != ALL:
            self.seen[deployment] = after
        self.floor = after if deployment == ALL else None
        self.remaining = limit

    @property
    def done(self) -> bool:
        return self.remaining == 0

    @property
    def last(self) -> Cursor | None:
        """The newest cursor sent (where a resume continues)."""
        if not self.seen:
            return self.after
        if self.deployment != ALL:
            return self.seen[self.deployment]
        return max(self.seen.values())

    def resume_hint(self) -> str | None:
        return last_cursor(self.seen)

    def fresh(self, events: Sequence[E]) -> list[E]:
        """The events not sent yet (in order), up to the limit, noted as sent."""
        out = []
        floor, seen = self.floor, self.seen
        for event in events:
            cursor = event.cursor
            if floor is not None and cursor.key() <= floor.key():
                continue
            prior = seen.get(cursor.deployment_id)
            if prior is not None and cursor.key() <= prior.key():
                continue
            seen[cursor.deployment_id] = cursor
            out.append(event)
            if self.remaining is not None:
                self.remaining -= 1
                if self.remaining == 0:
                    break
        return out

    def sent_live(self, lasts: Sequence[StoredEvent]) -> None:
        """Live events went out unfiltered; ``lasts`` are the newest of each run."""
        seen = self.seen
        for event in lasts:
            cursor = event.cursor
            prior = seen.get(cursor.deployment_id)
            if prior is None or prior.key() < cursor.key():
                seen[cursor.deployment_id] = cursor

    def sent_rows(self, rows: Sequence[Row]) -> None:
        """A page of raw rows of the one deployment went out as it is."""
        self.seen[self.deployment] = Cursor.from_entry(self.deployment, rows[-1][0])
        if self.remaining is not None:
            self.remaining -= len(rows)


def _fill_result(out: pb.EventResult, event_id: int, result: AppendResult, receive: int) -> None:
    """The EventResult of one stored (or refused) event of a batch."""
    outcome = result.outcome
    out.deployment_id = result.deployment_id
    out.outcome = _OUTCOMES[outcome]  # type: ignore[assignment]
    if outcome is Outcome.CREATED or outcome is Outcome.DUPLICATE:
        out.id = result.event_id
        out.cursor = result.cursor_bytes.decode()
        out.receive = receive
        return
    out.id = result.event_id or event_id
    out.reason = (
        f"id: event {event_id} exists with a different message"
        if outcome is Outcome.CONFLICT
        else f"id: deployment {result.deployment_id} has no free event id left"
    )


_TOKEN_PREFIX = "after:"  # noqa: S105 - a page token prefix, not a secret


def _encode_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{last_id}".encode()).decode()


def _decode_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if not text.startswith(_TOKEN_PREFIX):
            raise ValueError(text)
        value = int(text[len(_TOKEN_PREFIX) :])
        if value < 0:
            raise ValueError(text)
        return value
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this server issued") from None
