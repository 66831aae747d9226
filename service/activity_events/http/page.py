"""The activity page: deployments and their events in a browser, live.

Served on the HTTP side port beside ``/metrics`` (or on ``page_port``), off
with ``page_enabled=false``. Routes:

- ``/`` and ``/deployments/<id>``: the two pages (static HTML; data comes
  from the API below, so the HTML itself holds nothing secret).
- ``/static/<file>``: the page's CSS and JavaScript, shipped in the package
  (no CDN: the page works offline).
- ``/api/deployments?limit=N``: rows of the newest-active deployments.
- ``/api/deployments/<id>``: one deployment's row.
- ``/api/deployments/<id>/events?before=CURSOR&limit=N``: a page of events,
  newest first, strictly before the cursor ("load older").
- ``/api/deployments/<id>/stream`` (``Last-Event-ID`` or ``?after=CURSOR``)
  and ``/api/stream``: Server-Sent Events, see :mod:`activity_events.http.feeds`.

With ``auth_tokens_file`` set, every ``/api`` route needs a token with the
reader role (or admin), checked in constant time against the same token
table the gRPC call pipeline uses. The browser sends it as ``Authorization:
Bearer`` on fetches and as the ``access_token`` query parameter (RFC 6750)
on EventSource, which cannot set headers; responses carry no-referrer and
no-store so the URL does not travel further.

Admission is the gRPC side's (:mod:`activity_events.grpc.admission`): API
requests take a slot of the reads class, live streams one of kind
``page_streams`` (and of ``max_streams``); over budget the answer is 503 with
``Retry-After`` and a message naming the limit. A live stream whose browser
stops reading for ``stream_stall_seconds`` is closed (EventSource reconnects
and resumes from its last event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncGenerator
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING

from activity_events.domain import limits
from activity_events.domain.errors import (
    ActivityError,
    InvalidArgument,
    Overloaded,
    StoreUnavailable,
)
from activity_events.domain.events import Cursor
from activity_events.grpc import auth
from activity_events.grpc.admission import Admission, CallClass, StreamKind
from activity_events.http.feeds import deployment_feed, deployment_rows, event_json, list_feed
from activity_events.http.server import HttpPort, MetricsServer
from activity_events.http.web import (
    Request,
    response_head,
    send,
    send_error,
    send_json,
)
from activity_events.live.hub import Hub
from activity_events.redis import lanes
from activity_events.redis.lanes import REDIS_DOWN
from activity_events.redis.store import EventStore

if TYPE_CHECKING:
    from activity_events.app.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_PAGE = 50
"""Events per "load older" page unless the browser asks for another size."""

MAX_PAGE = 500
"""Largest page of events or deployments one request may ask for."""

DEFAULT_ROWS = 200
"""Deployments on the list page."""

STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}

PAGES = {"list": "index.html", "deployment": "deployment.html"}

_DEPLOYMENT = re.compile(r"^/deployments/(\d{1,10})/?$")
_API_DEPLOYMENT = re.compile(r"^/api/deployments/(\d{1,10})(/events|/stream)?$")
_STATIC = re.compile(r"^/static/([a-z0-9][a-z0-9._-]*)$")

STREAM_HIGH_WATER = 64 * 1024
"""Bytes a live stream may have waiting in its socket buffer before it waits for
the browser to read (at most ``stream_stall_seconds``)."""

STREAM_SOCKET_BUFFER = 256 * 1024
"""The kernel send buffer of a live stream's socket, fixed rather than autotuned:
a stalled browser holds at most this much kernel memory (autotuning grows it to
``tcp_wmem``'s maximum, megabytes), and one that stops reading is noticed after
this many bytes on any machine."""


def _is_stream(path: str) -> bool:
    return path == "/api/stream" or path.endswith("/stream")


class ClientError(Exception):
    """A request the page refuses with a 4xx status and a one-line reason."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _deployment_id(text: str) -> int:
    value = int(text)
    if not 0 < value <= limits.INT32_MAX:
        raise ClientError(HTTPStatus.NOT_FOUND, "no such deployment")
    return value


def _limit(request: Request, default: int) -> int:
    text = request.arg("limit")
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_PAGE:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"limit must be 1 to {MAX_PAGE}")
    return int(text)


def _cursor(text: str | None, deployment_id: int, name: str) -> Cursor | None:
    if text is None or text.strip() == "":
        return None
    try:
        return Cursor.parse(text, deployment_id=deployment_id, field=name)
    except InvalidArgument as error:
        raise ClientError(HTTPStatus.BAD_REQUEST, str(error)) from None


class ActivityPage:
    """Routes and serves the page's requests; see the module docstring."""

    def __init__(
        self,
        store: EventStore,
        hub: Hub,
        settings: Settings,
        admission: Admission,
        tokens: auth.TokenTable | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.settings = settings
        self.admission = admission
        self.tokens = tokens
        self.stall_seconds = settings.stream_stall_seconds
        self._streams: set[asyncio.Task[None]] = set()
        self._own: HttpPort | None = None
        self._assets = resources.files(__package__) / "static"

    # -- lifecycle -------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        """Live streams open now."""
        return len(self._streams)

    @property
    def port(self) -> int | None:
        """The page's own port (``page_port``), or None when it shares the metrics port."""
        return self._own.port if self._own is not None else None

    async def listen(self, host: str, port: int) -> int:
        """Serve on a port of its own (``page_port``); returns the bound port."""
        self._own = HttpPort("Activity page", host, port, [self])
        await self._own.start()
        return self._own.port

    def drop_streams(self) -> int:
        """End every live stream now (browsers reconnect and resume); how many were open."""
        streams = list(self._streams)
        for task in streams:
            task.cancel()
        return len(streams)

    async def stop(self) -> None:
        """Close the page's own port and end live streams."""
        streams = list(self._streams)
        self.drop_streams()
        if streams:
            await asyncio.wait(streams, timeout=2.0)
        if self._own is not None:
            await self._own.stop()
            self._own = None

    # -- routing ---------------------------------------------------------------

    @staticmethod
    def claims(path: str) -> bool:
        return (
            path == "/"
            or path.startswith("/deployments/")
            or path.startswith("/api/")
            or path.startswith("/static/")
        )

    async def serve(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer a request if it is the page's; False leaves it to the caller.

        The caller closes the connection afterwards.
        """
        if not self.claims(request.path):
            return False
        if request.method not in {"GET", "HEAD"}:
            await send_error(writer, request, HTTPStatus.METHOD_NOT_ALLOWED, "GET only",
                             {"Allow": "GET, HEAD"})  # fmt: skip
            return True
        try:
            await self._route(request, reader, writer)
        except ClientError as error:
            await send_error(writer, request, error.status, error.message)
        except Overloaded as error:
            await send_error(writer, request, HTTPStatus.SERVICE_UNAVAILABLE, str(error),
                             {"Retry-After": "2"})  # fmt: skip
        except (StoreUnavailable, TimeoutError, *REDIS_DOWN) as error:
            logger.warning("activity page: store unavailable (%s)", type(error).__name__)
            await send_error(writer, request, HTTPStatus.SERVICE_UNAVAILABLE,
                             "the event store is unavailable; retry shortly",
                             {"Retry-After": "2"})  # fmt: skip
        except ActivityError as error:
            await send_error(writer, request, HTTPStatus.BAD_REQUEST, str(error))
        return True

    async def _route(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        path = request.path
        if path == "/":
            await self._asset(writer, request, PAGES["list"])
            return
        match = _DEPLOYMENT.match(path)
        if match:
            _deployment_id(match.group(1))
            await self._asset(writer, request, PAGES["deployment"])
            return
        match = _STATIC.match(path)
        if match:
            await self._asset(writer, request, match.group(1))
            return
        if path.startswith("/api/"):
            self._authorize(request)
            if _is_stream(path):
                await self._api(request, reader, writer)
                return
            slot = self.admission.enter(CallClass.READS)
            lane = lanes.use(CallClass.READS.value)
            try:
                await self._api(request, reader, writer)
            finally:
                lanes.current.reset(lane)
                slot.release()
            return
        raise ClientError(HTTPStatus.NOT_FOUND, "not found")

    async def _api(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        path = request.path
        if path == "/api/deployments":
            rows, total = await deployment_rows(self.store, _limit(request, DEFAULT_ROWS))
            await send_json(writer, request, {"deployments": rows, "total": total})
            return
        if path == "/api/stream":
            feed = list_feed(self.store, self.hub, _limit(request, DEFAULT_ROWS))
            await self._stream(request, reader, writer, feed)
            return
        match = _API_DEPLOYMENT.match(path)
        if not match:
            raise ClientError(HTTPStatus.NOT_FOUND, "not found")
        deployment = _deployment_id(match.group(1))
        kind = match.group(2)
        if kind is None:
            rows, _ = await deployment_rows(self.store, 1, ids=[deployment])
            if not rows or not rows[0]["event_count"]:
                raise ClientError(HTTPStatus.NOT_FOUND, f"deployment {deployment} has no events")
            await send_json(writer, request, rows[0])
        elif kind == "/events":
            await self._events(request, writer, deployment)
        else:
            resume = request.headers.get("last-event-id") or request.arg("after")
            after = _cursor(resume, deployment, "after")
            if after is None:
                raise ClientError(
                    HTTPStatus.BAD_REQUEST,
                    "after: a cursor is needed (the newest one shown, or '0-0' for all)",
                )
            feed = deployment_feed(self.store, self.hub, deployment, after)
            await self._stream(request, reader, writer, feed)

    async def _events(
        self, request: Request, writer: asyncio.StreamWriter, deployment: int
    ) -> None:
        before = _cursor(request.arg("before"), deployment, "before")
        limit = _limit(request, DEFAULT_PAGE)
        events = await self.store.read_before(deployment, before, limit)
        body = {
            "events": [event_json(e) for e in events],
            "older": str(events[-1].cursor) if len(events) == limit else None,
        }
        await send_json(writer, request, body)

    # -- pieces ----------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        """Raise 401/403 unless auth is off or the request carries a reader token."""
        if self.tokens is None:
            return
        header = request.headers.get("authorization")
        token = auth.bearer_token([("authorization", header)] if header else None)
        if token is None:
            token = request.arg("access_token") or None
        principal = self.tokens.lookup(token) if token else None
        if principal is None:
            reason = "missing bearer token" if token is None else "unknown bearer token"
            raise ClientError(HTTPStatus.UNAUTHORIZED, reason)
        if not principal.may("reader"):
            raise ClientError(HTTPStatus.FORBIDDEN, "the page needs a token with role reader")

    async def _asset(self, writer: asyncio.StreamWriter, request: Request, name: str) -> None:
        suffix = name[name.rfind(".") :] if "." in name else ""
        content_type = STATIC_TYPES.get(suffix)
        asset = self._assets / name
        if content_type is None or not asset.is_file():
            raise ClientError(HTTPStatus.NOT_FOUND, "not found")
        await send(writer, request, HTTPStatus.OK, content_type, asset.read_bytes(),
                   {"Cache-Control": "no-cache"})  # fmt: skip

    async def _stream(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        feed: AsyncGenerator[bytes, None],
    ) -> None:
        """Send an SSE feed until it ends, the browser leaves, it stalls or is dropped."""
        if self.hub.stopping:
            await feed.aclose()
            raise StoreUnavailable("server is shutting down")
        try:
            ticket = self.admission.enter_stream(StreamKind.PAGE_STREAMS)
        except Overloaded:
            await feed.aclose()
            raise
        writer.write(
            response_head(
                HTTPStatus.OK,
                "text/event-stream; charset=utf-8",
                None,
                {"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        )
        if request.head_only:
            ticket.release()
            await feed.aclose()
            return
        _fix_send_buffer(writer)
        task = asyncio.create_task(self._pump(writer, feed), name="page-stream")
        gone = asyncio.create_task(reader.read(1), name="page-stream-peer")
        self._streams.add(task)
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ticket.release()
            self._streams.discard(task)
            for child in (task, gone):
                child.cancel()
            for child in (task, gone):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await child
            await feed.aclose()
        if task.done() and not task.cancelled():
            error = task.exception()
            if error is not None and not isinstance(error, ConnectionError):
                logger.warning("activity page stream ended by %s: %s", type(error).__name__, error)

    async def _pump(self, writer: asyncio.StreamWriter, feed: AsyncGenerator[bytes, None]) -> None:
        """Write the feed's frames, one loop turn each; a browser that stops reading
        for ``stream_stall_seconds`` ends it (counted as a refusal)."""
        lanes.use(CallClass.STREAMS.value)
        turns = self.admission.turns[CallClass.STREAMS]
        async for frame in feed:
            await turns.take()
            writer.write(frame)
            if writer.transport.get_write_buffer_size() > STREAM_HIGH_WATER:
                # The browser is not reading: wait, but not forever.
                try:
                    async with asyncio.timeout(self.stall_seconds):
                        await writer.drain()
                except TimeoutError:
                    self.admission.refuse(
                        CallClass.STREAMS,
                        "stalled",
                        f"page stream stalled for {self.stall_seconds:g}s "
                        f"(stream_stall_seconds={self.stall_seconds:g})",
                    )
                    return


def _fix_send_buffer(writer: asyncio.StreamWriter) -> None:
    """Fix the socket's send buffer at STREAM_SOCKET_BUFFER (no autotuning)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SOCKET_BUFFER)


async def start_page(
    settings: Settings,
    store: EventStore,
    hub: Hub,
    http: MetricsServer,
    *,
    admission: Admission,
    authenticator: auth.Authenticator | None,
) -> ActivityPage | None:
    """Build the page and attach it to the HTTP side port (or its own ``page_port``).

    ``http`` is the running HTTP side port; returns None when ``page_enabled``
    is false. Call :meth:`ActivityPage.stop` before stopping the hub and the
    HTTP side port.
    """
    if not settings.page_enabled:
        return None
    tokens = authenticator.table if authenticator is not None else None
    page = ActivityPage(store, hub, settings, admission, tokens)
    if settings.page_port is None:
        http.routes.append(page)
        logger.info(
            "Activity page is served on http://%s:%d/ (the HTTP side port)",
            settings.metrics_host,
            http.port,
        )
    else:
        await page.listen(settings.metrics_host, settings.page_port)
    return page
