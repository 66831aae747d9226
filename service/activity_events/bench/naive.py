"""A naive ActivityEvents server: what a competent developer writes in an afternoon.

The real server's figures mean little on their own on a machine as slow at
gRPC as the development VM; next to the echo server (the client's ceiling,
`activity_events.bench.echo`) and this one (the obvious design, no
sophistication) they say what the server's design costs or saves.

It is plain grpc.aio and redis-py (``redis.asyncio``, one client with its
default connection pool): no interceptors, no admission control, no
validation beyond protobuf's own, no dedup, no coalescing of concurrent
creates, no follow.

- CreateEvent: one XADD per call to ``naive:{d:<deployment>}:events`` with
  one field ``e`` = the EventRequest bytes (``timestamp.receive`` set), then
  ``EventResponse(id, success=True, cursor="<deployment>:<entry id>")``.
- CreateEvents: one XADD per event, sent as one pipeline; every event is
  reported CREATED.
- ListEvents: XRANGE in pages of 1,000, one parsed EventRequest per message
  (one deployment; id 0, "all deployments", is not supported).
- WatchEvents without follow: the same pages, one WatchEventsResponse each;
  with follow: UNIMPLEMENTED.
- grpc.health.v1 says SERVING once started (the bench's readiness wait).

    python -m activity_events.bench.naive --port 50099 --redis-url redis://127.0.0.1:6390/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

PAGE = 1000
"""Entries per XRANGE: big enough that round trips do not dominate, the usual choice."""

FIELD = b"e"
"""The one stream field of an entry: the serialized EventRequest."""


def events_key(deployment: int) -> str:
    """The stream of one deployment (hash-tagged like the real server's keys)."""
    return f"naive:{{d:{deployment}}}:events"


def _stored(request: pb.EventRequest, receive_ns: int) -> bytes:
    event = pb.EventRequest()
    event.CopyFrom(request)
    event.timestamp.receive = receive_ns
    return event.SerializeToString()


def _text(entry_id: bytes | str) -> str:
    """An entry id as text (the client does not decode responses, so it is bytes)."""
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def _rows(reply: Iterable[tuple[object, object]] | None) -> list[tuple[str, bytes]]:
    """An XRANGE reply as (entry id, stored bytes) rows."""
    rows = []
    for entry, fields in reply or ():
        if isinstance(entry, bytes) and isinstance(fields, dict):
            stored = fields.get(FIELD)
            if isinstance(stored, bytes):
                rows.append((entry.decode(), stored))
    return rows


def _execution_ms(request: pb.EventRequest, receive_ns: int) -> int:
    """(receive - send) in ms, as the original service reported; 0 without a send time."""
    send = request.timestamp.send
    return (receive_ns - send) // 1_000_000 if send else 0


class NaiveServicer(pb_grpc.ActivityEventsServicer):  # type: ignore[misc]
    """ActivityEvents on Redis Streams the straightforward way."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def CreateEvent(self, request: pb.EventRequest, context: Any) -> pb.EventResponse:
        receive = time.time_ns()
        entry = await self._redis.xadd(
            events_key(request.deployment_id), {FIELD: _stored(request, receive)}
        )
        return pb.EventResponse(
            id=request.id,
            success=True,
            execution_time=_execution_ms(request, receive),
            cursor=f"{request.deployment_id}:{_text(entry)}",
        )

    async def CreateEvents(
        self, request: pb.CreateEventsRequest, context: Any
    ) -> pb.CreateEventsResponse:
        receive = time.time_ns()
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in request.events:
                pipe.xadd(events_key(event.deployment_id), {FIELD: _stored(event, receive)})
            entries = await pipe.execute()
        return pb.CreateEventsResponse(
            results=[
                pb.EventResult(
                    index=index,
                    id=event.id,
                    deployment_id=event.deployment_id,
                    outcome=pb.OUTCOME_CREATED,
                    cursor=f"{event.deployment_id}:{_text(entry)}",
                    receive=receive,
                )
                for index, (event, entry) in enumerate(zip(request.events, entries, strict=True))
            ]
        )

    async def _pages(self, deployment: int) -> AsyncIterator[list[tuple[str, bytes]]]:
        """(entry id, stored bytes) pages, oldest first; each starts after the last one."""
        key, start = events_key(deployment), "-"
        while True:
            rows = _rows(await self._redis.xrange(key, min=start, count=PAGE))
            if not rows:
                return
            yield rows
            if len(rows) < PAGE:
                return
            start = "(" + rows[-1][0]

    async def ListEvents(
        self, request: pb.Deployment, context: Any
    ) -> AsyncIterator[pb.EventRequest]:
        async for page in self._pages(request.id):
            for _, stored in page:
                yield pb.EventRequest.FromString(stored)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        if request.follow:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the naive server cannot follow")
        deployment = request.deployment_id
        async for page in self._pages(deployment):
            yield pb.WatchEventsResponse(
                events=[
                    pb.StoredEvent(
                        event=pb.EventRequest.FromString(stored),
                        cursor=f"{deployment}:{entry}",
                    )
                    for entry, stored in page
                ]
            )


class NaiveServer:
    """The naive service and health on 127.0.0.1:``port`` (0 picks one), Redis at ``redis_url``."""

    def __init__(self, redis_url: str, port: int) -> None:
        self._redis = aioredis.Redis.from_url(redis_url)
        # No SO_REUSEPORT: a port picked free and then taken by another process must fail
        # loudly, not be shared with it.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._requested_port = port
        self.port = 0

    async def start(self) -> int:
        """Starts serving; returns the bound port."""
        pb_grpc.add_ActivityEventsServicer_to_server(NaiveServicer(self._redis), self._server)  # type: ignore[no-untyped-call]
        checks = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self._requested_port}")
        await self._server.start()
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        logger.info("naive server listening on %d", self.port)
        return self.port

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self) -> None:
        await self._server.stop(None)
        await self._redis.aclose()


async def serve(port: int, redis_url: str) -> None:
    """Serves until cancelled (SIGTERM/SIGINT end the process)."""
    server = NaiveServer(redis_url, port)
    try:
        await server.start()
        await server.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # uvloop like the real server and the echo server: the comparison is of designs, not loops.
    try:
        import uvloop  # noqa: PLC0415

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(args.port, args.redis_url))


if __name__ == "__main__":
    main()
