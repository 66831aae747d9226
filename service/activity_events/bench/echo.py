"""A trivial in-memory ActivityEvents server: the load generator's ceiling.

It answers every call from process memory with no Redis, no dedup and no
validation, so what a scenario reaches against it is the most the client
side (this bench, grpc.aio, protobuf) can drive on this machine. Run it in its
own process (``activity-bench --echo ...`` does), never in the client's loop,
or it would share the client's core and halve the figure it is meant to give.

    python -m activity_events.bench.echo --port 50099
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_PAGE = 500


class EchoServicer(pb_grpc.ActivityEventsServicer):  # type: ignore[misc]
    """Appends to lists and fans out to queues; the cheapest server with the same API."""

    def __init__(self) -> None:
        self._events: dict[int, list[pb.StoredEvent]] = {}
        self._followers: dict[int, set[asyncio.Queue[pb.StoredEvent]]] = {}
        self._last_ms = 0
        self._seq = 0

    def _append(self, request: pb.EventRequest) -> pb.StoredEvent:
        now = time.time_ns()
        ms = now // 1_000_000
        if ms <= self._last_ms:
            ms, self._seq = self._last_ms, self._seq + 1
        else:
            self._last_ms, self._seq = ms, 0
        event = pb.EventRequest()
        event.CopyFrom(request)
        event.timestamp.receive = now
        stored = pb.StoredEvent(event=event, cursor=f"{request.deployment_id}:{ms}-{self._seq}")
        self._events.setdefault(request.deployment_id, []).append(stored)
        for queue in self._followers.get(request.deployment_id, ()):
            queue.put_nowait(stored)
        return stored

    async def CreateEvent(self, request: pb.EventRequest, context: Any) -> pb.EventResponse:
        stored = self._append(request)
        return pb.EventResponse(id=request.id, success=True, cursor=stored.cursor)

    async def CreateEvents(
        self, request: pb.CreateEventsRequest, context: Any
    ) -> pb.CreateEventsResponse:
        results = []
        for index, event in enumerate(request.events):
            stored = self._append(event)
            results.append(
                pb.EventResult(
                    index=index,
                    id=event.id,
                    deployment_id=event.deployment_id,
                    outcome=pb.OUTCOME_CREATED,
                    cursor=stored.cursor,
                    receive=stored.event.timestamp.receive,
                )
            )
        return pb.CreateEventsResponse(results=results)

    async def ListEvents(
        self, request: pb.Deployment, context: Any
    ) -> AsyncIterator[pb.EventRequest]:
        for stored in list(self._events.get(request.id, ())):
            yield stored.event

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        history = list(self._events.get(request.deployment_id, ()))
        for start in range(0, len(history), _PAGE):
            yield pb.WatchEventsResponse(events=history[start : start + _PAGE])
        if not request.follow:
            return
        queue: asyncio.Queue[pb.StoredEvent] = asyncio.Queue()
        self._followers.setdefault(request.deployment_id, set()).add(queue)
        try:
            yield pb.WatchEventsResponse(caught_up=True)
            while True:
                batch = [await queue.get()]
                while not queue.empty() and len(batch) < _PAGE:
                    batch.append(queue.get_nowait())
                yield pb.WatchEventsResponse(events=batch)
        finally:
            self._followers[request.deployment_id].discard(queue)

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: Any
    ) -> pb.DeleteDeploymentResponse:
        removed = self._events.pop(request.deployment_id, [])
        return pb.DeleteDeploymentResponse(deleted_events=len(removed))


async def serve(port: int) -> None:
    """Serves on 127.0.0.1:``port`` until cancelled."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ActivityEventsServicer_to_server(EchoServicer(), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    logger.info("Server has been started on %d", bound)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import uvloop  # noqa: PLC0415

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
