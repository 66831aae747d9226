"""The ActivityEvents gRPC servicer: the api layer.

It validates requests, calls the store and the hub, maps domain errors to gRPC
status codes (in one table, :data:`STATUS`), and shapes responses. It knows no
Redis commands. Streaming handlers are async generators (never
``context.write``), and the two history streams yield bytes assembled by
:mod:`wire`, registered with an identity serializer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from activity_events import SERVICE_NAME
from activity_events.app.settings import Settings
from activity_events.codec import wire
from activity_events.domain.errors import (
    ActivityError,
    Conflict,
    Corrupt,
    Exhausted,
    FollowerLagged,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ShuttingDown,
    StoreUnavailable,
)
from activity_events.domain.events import Cursor, StoredEvent, validate_deployment_id, validate_new
from activity_events.live.hub import ALL, Hub, Subscription, last_cursor
from activity_events.observability.metrics import ServiceMetrics
from activity_events.pb import activityevents_pb2 as pb
from activity_events.redis.store import AppendResult, EventStore, Outcome

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

STATUS: dict[type[ActivityError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    Corrupt: grpc.StatusCode.DATA_LOSS,
}
"""Domain error -> gRPC status. Subclasses map through their nearest listed base."""

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_RESPONSE_BYTES = 1 << 20
"""Largest WatchEvents message assembled, well under gRPC's default 4 MiB client limit."""
MAX_CATCHUPS = 5
"""Times a follower that overflowed while reading history re-reads from Redis
before it is treated as unable to keep up."""

_OUTCOMES = {
    Outcome.CREATED: pb.OUTCOME_CREATED,
    Outcome.DUPLICATE: pb.OUTCOME_DUPLICATE,
    Outcome.CONFLICT: pb.OUTCOME_CONFLICT,
    Outcome.EXHAUSTED: pb.OUTCOME_INVALID,
}


class Malformed:
    """Stands in for a request whose bytes did not parse as its message type.

    grpc reports an exception raised by a request deserializer as UNKNOWN;
    parsing through :func:`parser` instead lets the handler answer
    INVALID_ARGUMENT, which is what such a request is.
    """

    __slots__ = ("problem", "type_name")

    def __init__(self, type_name: str, problem: str) -> None:
        self.type_name = type_name
        self.problem = problem

    def error(self) -> InvalidArgument:
        return InvalidArgument("request", f"is not a valid {self.type_name}: {self.problem}")


def parser(message_type: Any) -> Any:
    """A request deserializer that never raises: bad bytes become Malformed."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return Malformed(name, str(error).split(":")[-1].strip()[:120] or "undecodable")

    return parse


def status_of(error: ActivityError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


class _Limit:
    """A non-queueing concurrency limit: beyond ``size`` calls are refused at once."""

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.active = 0
        self.what = what
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.active >= self.size:
            raise Exhausted(f"too many {self.what} (limit {self.size}); retry later")
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no call holds the limit (callers bound the wait)."""
        await self._idle.wait()


class ActivityEventsServicer:
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
        self.draining = False
        """Set at shutdown: new calls get UNAVAILABLE while in-flight ones finish."""
        self.unary_limit = _Limit(settings.max_concurrent_unary, "concurrent calls")
        self.follower_limit = _Limit(settings.max_followers, "followers")

    def _count(self, results: Iterable[AppendResult], invalid: int = 0) -> None:
        """Event outcomes into the service metrics (EXHAUSTED is answered as INVALID)."""
        if self._metrics is None:
            return
        outcomes = Counter(result.outcome for result in results)
        self._metrics.record_outcomes(
            created=outcomes[Outcome.CREATED],
            duplicates=outcomes[Outcome.DUPLICATE],
            conflicts=outcomes[Outcome.CONFLICT],
            invalid=invalid + outcomes[Outcome.EXHAUSTED],
        )

    # -- error mapping -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _call(
        self, context: Context, request: Any, *, limit: _Limit | None = None
    ) -> AsyncIterator[None]:
        """Map domain errors to statuses; refuse malformed requests and calls over a limit."""
        try:
            if self.draining:
                raise ShuttingDown("server is shutting down; retry on another replica")
            if isinstance(request, Malformed):
                raise request.error()
            if limit is None:
                yield
            else:
                with limit.hold():
                    yield
        except ActivityError as error:
            if isinstance(error, FollowerLagged) and self._metrics is not None:
                self._metrics.follower_overflows.inc()
            await context.abort(status_of(error), str(error))

    # -- legacy RPCs ---------------------------------------------------------------

    async def CreateEvent(self, request: pb.EventRequest, context: Context) -> pb.EventResponse:
        async with self._call(context, request, limit=self.unary_limit):
            try:
                new = validate_new(request, max_message_bytes=self._settings.max_message_bytes)
            except InvalidArgument:
                self._count((), invalid=1)
                raise
            receive = time.time_ns()
            result = await self._store.append_one(new, receive)
            self._count([result])
            _raise_for(result, request.deployment_id, request.id)
            return pb.EventResponse(
                id=result.event_id,
                success=True,
                execution_time=new.execution_ms(receive),
                duplicate=result.outcome is Outcome.DUPLICATE,
                cursor=result.cursor_bytes.decode(),
            )
        raise AssertionError("unreachable")  # abort() raised

    async def ListEvents(self, request: pb.Deployment, context: Context) -> AsyncIterator[bytes]:
        async with self._call(context, request, limit=self.unary_limit):
            deployment = validate_deployment_id(request.id, field="id", allow_all=True)
            if deployment == ALL:
                async for page in self._store.history_all(None):
                    for event in page:
                        yield event.payload
            else:
                prefix = f"{deployment}:".encode()
                async for rows in self._store.history_flat(deployment, None, None):
                    for entry, fields in rows:
                        yield wire.payload_of(prefix, entry, fields)

    # -- new RPCs ------------------------------------------------------------------

    async def CreateEvents(self, request: pb.CreateEventsRequest, context: Context) -> bytes:
        async with self._call(context, request, limit=self.unary_limit):
            if len(request.events) > self._settings.max_batch:
                raise InvalidArgument(
                    "events",
                    f"{len(request.events)} events; at most {self._settings.max_batch} per call",
                )
            if self._metrics is not None:
                self._metrics.batch_size.observe(len(request.events))
            results: list[bytes] = []
            valid = []
            where = []
            limit = self._settings.max_message_bytes
            for index, event in enumerate(request.events):
                try:
                    valid.append(validate_new(event, max_message_bytes=limit))
                    where.append(index)
                    results.append(b"")  # filled in once stored
                except InvalidArgument as error:
                    results.append(
                        wire.event_result(
                            index,
                            event.id,
                            event.deployment_id,
                            pb.OUTCOME_INVALID,
                            reason=str(error),
                        )
                    )
            if valid:
                receive = time.time_ns()
                stored = await self._store.append(valid, receive)
                self._count(stored)
                receive_field = wire.receive_field(receive)
                for index, new, result in zip(where, valid, stored, strict=True):
                    outcome = result.outcome
                    if outcome is Outcome.CREATED or outcome is Outcome.DUPLICATE:
                        results[index] = wire.event_result_from_parts(
                            index,
                            result.event_id,
                            wire.deployment_and_outcome(new.deployment_id, _OUTCOMES[outcome]),
                            result.cursor_bytes,
                            receive_field,
                        )
                    else:
                        reason = (
                            f"id: event {new.event_id} exists with a different message"
                            if outcome is Outcome.CONFLICT
                            else f"id: deployment {new.deployment_id} has no free event id left"
                        )
                        results[index] = wire.event_result(
                            index,
                            result.event_id or new.event_id,
                            new.deployment_id,
                            _OUTCOMES[outcome],
                            reason=reason,
                        )
            self._count((), invalid=len(results) - len(valid))
            return b"".join(results)
        raise AssertionError("unreachable")

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        limit = self.follower_limit if getattr(request, "follow", False) else self.unary_limit
        async with self._call(context, request, limit=limit):
            deployment = validate_deployment_id(request.deployment_id, allow_all=True)
            if request.limit < 0:
                raise InvalidArgument(
                    "limit", f"must be >= 0 (0 means no limit), got {request.limit}"
                )
            after = Cursor.parse(request.after, deployment_id=deployment) if request.after else None
            if after is not None:
                if deployment == ALL:
                    await self._store.check_cursor_all(after)
                else:
                    await self._store.check_cursor(after)
            sub = await self._hub.subscribe(deployment) if request.follow else None
            try:
                async for chunk in self._watch(deployment, after, request.limit or None, sub):
                    yield chunk
            finally:
                if sub is not None:
                    sub.close()

    async def _watch(
        self, deployment: int, after: Cursor | None, limit: int | None, sub: Subscription | None
    ) -> AsyncIterator[bytes]:
        seen: dict[int, Cursor] = {}
        if after is not None and deployment != ALL:
            seen[deployment] = after
        floor = after if deployment == ALL else None
        remaining = limit

        def fresh(events: list[StoredEvent]) -> list[StoredEvent]:
            nonlocal remaining
            out = []
            for event in events:
                cursor = event.cursor
                if floor is not None and cursor.key() <= floor.key():
                    continue
                prior = seen.get(cursor.deployment_id)
                if prior is not None and cursor.key() <= prior.key():
                    continue
                seen[cursor.deployment_id] = cursor
                out.append(event)
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        break
            return out

        position = after
        for _ in range(MAX_CATCHUPS):
            if deployment == ALL:
                async for merged in self._store.history_all(position):
                    for message in wire.watch_responses(fresh(merged), MAX_RESPONSE_BYTES):
                        yield message
                    if remaining == 0:
                        return
            else:
                # One deployment: pages are strictly after `position` and in
                # order, so they go out as wire bytes with no per-event objects.
                prefix = f"{deployment}:".encode()
                async for rows in self._store.history_flat(deployment, position, remaining):
                    seen[deployment] = Cursor.from_entry(deployment, rows[-1][0])
                    if remaining is not None:
                        remaining -= len(rows)
                    for message in wire.watch_responses_rows(prefix, rows, MAX_RESPONSE_BYTES):
                        yield message
                    if remaining == 0:
                        return
            if sub is None:
                return
            if not sub.lagged:
                break
            # Live events overflowed while history was read: drop them and catch up from Redis.
            sub.reset()
            if seen:
                position = seen[deployment] if deployment != ALL else max(seen.values())
        if sub is None:
            return
        yield wire.CAUGHT_UP
        page_size = self._settings.page_size
        while not self._hub.stopping:
            batch = await sub.next_batch(last_cursor(seen), page_size)
            for message in wire.watch_responses(fresh(batch), MAX_RESPONSE_BYTES):
                yield message
            if remaining == 0:
                return

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: Context
    ) -> pb.ListDeploymentsResponse:
        async with self._call(context, request, limit=self.unary_limit):
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
        raise AssertionError("unreachable")

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: Context
    ) -> pb.DeleteDeploymentResponse:
        async with self._call(context, request, limit=self.unary_limit):
            deployment = validate_deployment_id(request.deployment_id, allow_all=False)
            removed = await self._store.delete(deployment)
            if self._metrics is not None:
                self._metrics.events_deleted.inc(removed)
            logger.info("deployment %d deleted with %d events", deployment, removed)
            return pb.DeleteDeploymentResponse(deleted_events=removed)
        raise AssertionError("unreachable")


def _raise_for(result: AppendResult, deployment_id: int, event_id: int) -> None:
    if result.outcome is Outcome.CONFLICT:
        raise Conflict(
            f"id: event {event_id} of deployment {deployment_id} already exists with a "
            f"different message (cursor {result.cursor})"
        )
    if result.outcome is Outcome.EXHAUSTED:
        raise Exhausted(f"id: deployment {deployment_id} has no free event id left")


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


def generic_handler(servicer: ActivityEventsServicer) -> grpc.GenericRpcHandler[Any, Any]:
    """The service's method handlers. Like the generated ``add_..._to_server``, but
    the history streams use an identity serializer: they yield wire bytes."""
    handlers: dict[str, Any] = {
        "CreateEvent": grpc.unary_unary_rpc_method_handler(
            servicer.CreateEvent,
            request_deserializer=parser(pb.EventRequest),
            response_serializer=pb.EventResponse.SerializeToString,
        ),
        "ListEvents": grpc.unary_stream_rpc_method_handler(
            servicer.ListEvents,
            request_deserializer=parser(pb.Deployment),
            response_serializer=wire.identity,
        ),
        "WatchEvents": grpc.unary_stream_rpc_method_handler(
            servicer.WatchEvents,
            request_deserializer=parser(pb.WatchEventsRequest),
            response_serializer=wire.identity,
        ),
        "CreateEvents": grpc.unary_unary_rpc_method_handler(
            servicer.CreateEvents,
            request_deserializer=parser(pb.CreateEventsRequest),
            response_serializer=wire.identity,  # wire.event_result bytes
        ),
        "ListDeployments": grpc.unary_unary_rpc_method_handler(
            servicer.ListDeployments,
            request_deserializer=parser(pb.ListDeploymentsRequest),
            response_serializer=pb.ListDeploymentsResponse.SerializeToString,
        ),
        "DeleteDeployment": grpc.unary_unary_rpc_method_handler(
            servicer.DeleteDeployment,
            request_deserializer=parser(pb.DeleteDeploymentRequest),
            response_serializer=pb.DeleteDeploymentResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
