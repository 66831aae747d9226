"""The call pipeline: one wrapper per method, built once when methods are registered.

Every method of every service the server serves (ActivityEvents,
Subscriptions, health, reflection) is registered through :class:`Pipeline`,
which wraps the servicer's handler in one function of the method's shape.
That function does, for each call and in this order:

1. **metrics**: ``grpc_server_started_total`` (then messages in and out, and
   ``handled``/``handling_seconds`` when the call ends);
2. **authentication and roles** (:mod:`activity_events.grpc.auth`), before the
   request is parsed, so a refused caller never reaches the parser;
3. **drain**: while the server shuts down new calls get UNAVAILABLE (health
   excepted, so probes keep their answers);
4. **deadline**: a call whose deadline passed before it started is not run;
5. **admission** (:mod:`activity_events.grpc.admission`): a slot of the call's
   class, or RESOURCE_EXHAUSTED at once; the call's Redis commands use that
   class's lane (:mod:`activity_events.redis.lanes`);
6. **request parsing**: bytes that do not parse are INVALID_ARGUMENT (grpc
   itself would say UNKNOWN);
7. **the handler**, inside the call's span (when tracing records or the
   client sent a trace context); server streams are watched for clients
   that stop reading (:mod:`activity_events.grpc.watchdog`);
8. **error → status**: domain errors through the one table
   (:mod:`activity_events.grpc.errors`), anything unexpected as INTERNAL with
   a message that reveals nothing (the traceback goes to the log);
9. **access log** and the end of the span.

There is no chain of interceptors: the four shapes are handled here once,
and services contain only what they do.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from opentelemetry import context as otel_context

from activity_events.domain.errors import (
    ActivityError,
    DeadlineExceeded,
    FollowerLagged,
    ShuttingDown,
    Stalled,
)
from activity_events.grpc.admission import Admission, CallClass, StreamKind
from activity_events.grpc.auth import ANY_TOKEN, Authenticator
from activity_events.grpc.errors import parse, status_for
from activity_events.grpc.watchdog import StreamWatchdog
from activity_events.observability import access
from activity_events.observability.grpc_metrics import (
    GO_CODE_NAMES,
    GrpcServerMetrics,
    MethodMetrics,
    grpc_type,
    status_of,
)
from activity_events.observability.tracing import RpcSpan, ServerTracing
from activity_events.redis import lanes

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

Admit = CallClass | StreamKind
"""Where a call is admitted: a class, or (for long-lived streams) a stream kind."""


@dataclass(frozen=True, slots=True)
class Policy:
    """How the pipeline treats one method.

    ``admit`` is the call's class or stream kind, or a function of the parsed
    request that says which (WatchEvents: a follower only with ``follow``).
    ``role`` is the auth role it needs (None: open to all; ``ANY_TOKEN``: any
    valid token). ``quiet`` methods (health, reflection) log at DEBUG and are
    not traced: probes would drown both.
    """

    admit: Admit | Callable[[Any], Admit]
    role: str | None = "admin"
    quiet: bool = False


DEFAULT_POLICY = Policy(CallClass.READS, "admin")
"""For a method no policy names: the strictest role, the reads budget."""

OK = grpc.StatusCode.OK
_CANCELLED = (asyncio.CancelledError, GeneratorExit)


def serialize(message: Any) -> bytes:
    """Response serializer of every method: wire bytes pass through as they are
    (history and subscription streams assemble them by hand), messages are
    serialized."""
    return message if type(message) is bytes else message.SerializeToString()  # type: ignore[no-any-return]


class Shape(enum.Enum):
    UNARY_UNARY = (False, False)
    UNARY_STREAM = (False, True)
    STREAM_UNARY = (True, False)
    STREAM_STREAM = (True, True)


class Method:
    """Everything about one method the wrapper needs, resolved at registration."""

    __slots__ = (
        "access",
        "admit",
        "call_class",
        "full_name",
        "kind",
        "lane",
        "metrics",
        "name",
        "policy",
        "quiet",
        "request_type",
        "role",
        "service",
    )

    def __init__(
        self,
        service: str,
        name: str,
        *,
        shape: Shape,
        request_type: Any,
        policy: Policy,
        metrics: MethodMetrics,
        role: str | None,
    ) -> None:
        self.service = service
        self.name = name
        self.full_name = f"/{service}/{name}"
        self.kind = grpc_type(*shape.value)
        self.request_type = request_type
        self.policy = policy
        self.metrics = metrics
        self.role = role
        self.quiet = policy.quiet
        self.access = access.AccessLog(service, name, self.kind, quiet=policy.quiet)
        static = None if callable(policy.admit) else policy.admit
        self.admit: Admit | None = static
        """The static class or kind; None when it depends on the request."""
        self.call_class: CallClass | None = None
        self.lane = ""
        if static is not None:
            self.call_class, self.lane = _class_of(static)


def _class_of(admit: Admit) -> tuple[CallClass, str]:
    """The admission class and Redis lane of an Admit."""
    if isinstance(admit, StreamKind):
        return CallClass.STREAMS, "streams"
    return admit, admit.value


class Call:
    """The state of one call while it runs."""

    __slots__ = (
        "code",
        "cursor",
        "deadline",
        "deployments",
        "ended",
        "error",
        "method",
        "next_cursor",
        "peer",
        "received",
        "sent",
        "span",
        "started",
        "ticket",
    )

    def __init__(self, method: Method) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.code: grpc.StatusCode | None = None
        self.error: BaseException | None = None
        self.received = 0
        self.sent = 0
        self.deployments: list[int] | None = None
        self.span: RpcSpan | None = None
        self.ticket: Any = None
        self.cursor: str | None = None
        """Last cursor of the last message grpc finished sending (see note_cursor)."""
        self.next_cursor: str | None = None
        """Last cursor of the message being sent."""
        self.deadline: float | None = None
        """time.monotonic() of the client's deadline, if it set one."""
        self.peer = ""
        """The client's address, read when the call starts: grpc must not be asked
        once the call may be over (its call object may be gone)."""
        self.ended = False
        """Metrics, log line and span are recorded (once, see Pipeline._end)."""

    def release(self) -> None:
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.release()


_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("call", default=None)


def note_cursor(cursor: str) -> None:
    """Record the last cursor of the message a stream is about to yield. Once grpc
    has sent that message it is the cursor a stream ended for stalling tells its
    client to resume after: never past what the client was sent."""
    call = _current.get()
    if call is not None:
        call.next_cursor = cursor


class Pipeline:
    """Wraps and registers the methods of a server; see the module docstring."""

    def __init__(
        self,
        *,
        admission: Admission,
        metrics: GrpcServerMetrics,
        watchdog: StreamWatchdog,
        authenticator: Authenticator | None = None,
        tracing: ServerTracing | None = None,
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self.admission = admission
        self.metrics = metrics
        self.watchdog = watchdog
        self.authenticator = authenticator
        self.tracing = tracing if tracing is not None else ServerTracing()
        self.pool = pool or descriptor_pool.Default()
        self.draining = False
        """Set at shutdown: new calls (but health) are refused with UNAVAILABLE."""

    # -- registration ------------------------------------------------------------

    def add(
        self,
        server: grpc.aio.Server,
        add_servicer: Callable[[Any, Any], None],
        servicer: Any,
        policies: Mapping[str, Policy],
    ) -> None:
        """Register ``servicer`` the way its generated ``add_..._to_server``
        function would, every method wrapped (``policies`` by method name)."""
        capture = _Capture()
        add_servicer(servicer, capture)
        for service, handlers in capture.services.items():
            self.add_handlers(server, service, handlers, policies)

    def add_handlers(
        self,
        server: grpc.aio.Server,
        service: str,
        handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
        policies: Mapping[str, Policy],
    ) -> None:
        descriptor = self.pool.FindServiceByName(service)
        self.metrics.initialize(descriptor)
        wrapped = {
            name: self.wrap(descriptor, name, handler, policies.get(name, DEFAULT_POLICY))
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]

    def wrap(
        self,
        service: ServiceDescriptor,
        name: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        policy: Policy,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The pipeline's handler for one method of ``service``."""
        described = service.methods_by_name[name]
        shape = Shape((handler.request_streaming, handler.response_streaming))
        role = policy.role
        if self.authenticator is None or (role == ANY_TOKEN and self.authenticator.reflection_open):
            role = None
        method = Method(
            service.full_name,
            name,
            shape=shape,
            request_type=GetMessageClass(described.input_type),
            policy=policy,
            metrics=self.metrics.method(service.full_name, name, grpc_type(*shape.value)),
            role=role,
        )
        if shape is Shape.UNARY_UNARY:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_unary(method, handler.unary_unary), None, serialize
            )
        if shape is Shape.UNARY_STREAM:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, handler.unary_stream), None, serialize
            )
        if shape is Shape.STREAM_UNARY:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(method, handler.stream_unary), None, serialize
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream_stream(method, handler.stream_stream), None, serialize
        )

    # -- the stages ---------------------------------------------------------------

    def _begin(self, call: Call, context: Any) -> None:
        """Stages 1-5 that need no request: metrics, auth, drain, deadline, and
        admission when the method's class is static."""
        method = call.method
        method.metrics.started += 1
        call.peer = context.peer()
        metadata = None
        if method.role is not None:
            metadata = context.invocation_metadata()
            self.authenticator.check(method.full_name, method.role, metadata)  # type: ignore[union-attr]
        if self.draining and method.call_class is not CallClass.HEALTH:
            raise ShuttingDown("server is shutting down; retry on another replica")
        remaining = context.time_remaining()
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExceeded("the deadline had passed before the call started")
            call.deadline = time.monotonic() + remaining
        if not method.quiet:
            if metadata is None:
                metadata = context.invocation_metadata()
            call.span = self.tracing.start(method.service, method.name, metadata or (), call.peer)
        if method.admit is not None:
            self._admit(call, method.admit)

    def _admit(self, call: Call, admit: Admit) -> None:
        if isinstance(admit, StreamKind):
            call.ticket = self.admission.enter_stream(admit)
        else:
            call.ticket = _Once(self.admission.enter(admit))

    def _request(self, call: Call, raw: bytes) -> Any:
        """Stage 6 (and 5 when the class depends on the request)."""
        method = call.method
        request = parse(method.request_type, raw)
        method.metrics.received += 1
        call.received = 1
        if not method.quiet:
            call.deployments = access.deployment_ids(request)
            if call.span is not None:
                call.span.note_request(call.deployments)
        if method.admit is None:
            self._admit(call, method.policy.admit(request))  # type: ignore[operator]
        return request

    async def _requests(self, call: Call, raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        """A client stream's messages, parsed and counted as they arrive."""
        method = call.method
        async for data in raw:
            request = parse(method.request_type, data)
            method.metrics.received += 1
            call.received += 1
            if call.deployments is None and not method.quiet:
                call.deployments = access.deployment_ids(request)
                if call.span is not None:
                    call.span.note_request(call.deployments)
            yield request

    async def _fail(self, call: Call, context: Context, error: BaseException) -> NoReturn:
        """Stage 8: record the status of ``error`` and send it (raises AbortError)."""
        if isinstance(error, ActivityError):
            if isinstance(error, FollowerLagged):
                self.admission.count(CallClass.STREAMS, "lagged")
            code = status_for(error)
            call.code = code
            call.error = error
            # Recorded before the status goes out: abort() sends it before it
            # raises, and a client that has its status may look at the metrics.
            self._end(call, context, error)
            await context.abort(code, str(error))
        call.code = grpc.StatusCode.INTERNAL
        call.error = error
        logger.error(
            "%s failed unexpectedly: %s: %s",
            call.method.full_name,
            type(error).__name__,
            error,
            exc_info=error,
        )
        self._end(call, context, error)
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
        )

    def _end(self, call: Call, context: Any, error: BaseException | None) -> None:
        """Stage 9 and the end of stage 1: metrics, access log, span (once a call)."""
        call.release()
        if call.ended:
            return
        call.ended = True
        code = call.code
        if code is None:
            code = OK if error is None else _status(call, context, error)
            call.code = code
        method = call.method
        seconds = time.perf_counter() - call.started
        metrics = method.metrics
        metrics.handled[code] += 1
        metrics.observe(seconds)
        log = method.access
        if access.logger.isEnabledFor(log.level):
            unexpected = call.error if code is grpc.StatusCode.INTERNAL else None
            log.write(
                GO_CODE_NAMES[code],
                seconds,
                call.peer,
                call.received,
                call.sent,
                call.deployments,
                unexpected,
                None if call.span is None else call.span.span,
            )
        if call.span is not None:
            call.span.end(code, call.error or error)

    # -- the four shapes -------------------------------------------------------------

    def _unary_unary(self, method: Method, behaviour: Any) -> Any:
        async def unary_unary(raw: bytes, context: Any) -> Any:
            call = Call(method)
            span_token = lane_token = None
            error: BaseException | None = None
            try:
                try:
                    self._begin(call, context)
                    if call.span is not None:
                        span_token = otel_context.attach(call.span.context)
                    request = self._request(call, raw)
                    lane_token = lanes.current.set(_lane_of(call, method))
                    response = await behaviour(request, context)
                except (grpc.aio.AbortError, *_CANCELLED) as stop:
                    error = stop
                    raise
                except Exception as failure:
                    await self._fail(call, context, failure)
                call.sent = 1
                method.metrics.sent += 1
                return response
            finally:
                self._end(call, context, error)
                if lane_token is not None:
                    lanes.current.reset(lane_token)
                if span_token is not None:
                    otel_context.detach(span_token)

        return unary_unary

    def _stream_unary(self, method: Method, behaviour: Any) -> Any:
        async def stream_unary(raw: AsyncIterator[bytes], context: Any) -> Any:
            call = Call(method)
            span_token = lane_token = None
            error: BaseException | None = None
            try:
                try:
                    self._begin(call, context)
                    if call.span is not None:
                        span_token = otel_context.attach(call.span.context)
                    lane_token = lanes.current.set(method.lane or "reads")
                    response = await behaviour(self._requests(call, raw), context)
                except (grpc.aio.AbortError, *_CANCELLED) as stop:
                    error = stop
                    raise
                except Exception as failure:
                    await self._fail(call, context, failure)
                call.sent = 1
                method.metrics.sent += 1
                return response
            finally:
                self._end(call, context, error)
                if lane_token is not None:
                    lanes.current.reset(lane_token)
                if span_token is not None:
                    otel_context.detach(span_token)

        return stream_unary

    def _unary_stream(self, method: Method, behaviour: Any) -> Any:
        async def unary_stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
            call = Call(method)
            error: BaseException | None = None
            try:
                try:
                    self._begin(call, context)
                    request = self._request(call, raw)
                    responses = behaviour(request, context)
                except Exception as failure:
                    await self._fail(call, context, failure)
                async for message in self._stream(call, context, responses):
                    yield message
            except BaseException as stop:
                error = stop
                raise
            finally:
                self._end(call, context, error)

        return unary_stream

    def _stream_stream(self, method: Method, behaviour: Any) -> Any:
        async def stream_stream(raw: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
            call = Call(method)
            error: BaseException | None = None
            try:
                try:
                    self._begin(call, context)
                    responses = behaviour(self._requests(call, raw), context)
                except Exception as failure:
                    await self._fail(call, context, failure)
                async for message in self._stream(call, context, responses):
                    yield message
            except BaseException as stop:
                error = stop
                raise
            finally:
                self._end(call, context, error)

        return stream_stream

    async def _stream(self, call: Call, context: Any, responses: Any) -> AsyncIterator[Any]:
        """A server stream's messages: in the call's span and lane, counted, and
        watched for a client that stops reading; errors mapped (stage 8)."""
        method = call.method
        span = call.span
        metrics = method.metrics
        watched = self.watchdog.watch(context, lambda: self._stalled(call))
        if span is not None:
            span.streaming()
        iterator = aiter(responses)
        lane = _lane_of(call, method)
        turns = self.admission.turns.get(method.call_class or _class_name(call))
        try:
            while True:
                span_token = otel_context.attach(span.context) if span is not None else None
                lane_token = _current.set(call), lanes.current.set(lane)
                try:
                    message = await anext(iterator)
                except StopAsyncIteration:
                    return
                except grpc.aio.AbortError:
                    raise  # the handler's own context.abort: its status is sent
                except Exception as failure:
                    await self._fail(call, context, failure)
                finally:
                    lanes.current.reset(lane_token[1])
                    _current.reset(lane_token[0])
                    if span_token is not None:
                        otel_context.detach(span_token)
                call.sent += 1
                metrics.sent += 1
                delivery = None if span is None else span.sending(message)
                if turns is not None:
                    await turns.take()
                sending = call.next_cursor
                watched.sending_since = time.monotonic()
                try:
                    yield message
                    call.cursor = sending
                finally:
                    watched.sending_since = None
                    if delivery is not None:
                        delivery.end()
        finally:
            self.watchdog.forget(watched)
            await _close(iterator)

    def _stalled(self, call: Call) -> str:
        """A stream's client stopped reading: release the call's slot, count it, and
        answer the status message (see :mod:`activity_events.grpc.watchdog`)."""
        method = call.method
        seconds = self.watchdog.stall_seconds
        message = (
            f"stream stalled: the client read nothing for {seconds:g}s "
            f"(stream_stall_seconds={seconds:g}); ended after {call.sent} messages"
        )
        if call.cursor is not None:
            message += f"; resume with after={call.cursor}"
        call_class = method.call_class or CallClass.READS
        error = self.admission.refuse(call_class, "stalled", message)
        call.code = grpc.StatusCode.RESOURCE_EXHAUSTED
        call.error = Stalled(str(error))
        call.release()
        return message


def _status(call: Call, context: Context, error: BaseException) -> grpc.StatusCode:
    """The status a call ended with when the pipeline did not set one: the
    handler's own ``context.abort``, or cancellation (the client left, or its
    deadline passed). grpc is not asked about a cancelled call: it may be gone."""
    if isinstance(error, _CANCELLED):
        if call.deadline is not None and time.monotonic() >= call.deadline:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return status_of(context, error)


async def _close(iterator: Any) -> None:
    """Close a handler's response iterator if it can be (an async generator)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _class_name(call: Call) -> CallClass:
    """The class a request-dependent call was admitted to."""
    ticket = call.ticket
    if isinstance(ticket, _Once):
        return CallClass(ticket.budget.name)
    return CallClass.STREAMS


def _lane_of(call: Call, method: Method) -> str:
    if method.lane:
        return method.lane
    ticket = call.ticket
    if isinstance(ticket, _Once):
        return str(ticket.budget.name)
    return "streams"


class _Once:
    """A class budget's slot, released at most once."""

    __slots__ = ("budget",)

    def __init__(self, budget: Any) -> None:
        self.budget = budget

    def release(self) -> None:
        if self.budget is not None:
            budget, self.budget = self.budget, None
            budget.release()


class _Capture:
    """Stands in for a server while a generated ``add_..._to_server`` registers
    a servicer: keeps the method handlers so the pipeline can wrap them."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        """Generated code registers each service twice; the named form is kept."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.services.setdefault(service, {}).update(handlers)
