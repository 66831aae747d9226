"""The ``subscribe`` benchmark: events acknowledged per second through Subscribe.

A deployment is filled before the clock starts; then ``consumers`` consumers
of one fresh subscription (starting at the beginning) receive every event and
acknowledge each response's deliveries at once, on the same stream. The clock
stops when the server reports nothing pending and no lag, so the rate counts
events that are *acknowledged in Redis*, not merely sent.

Two entry points: :func:`run_subscribe` for the activity-bench scenario table
(``SCENARIO_RUNNERS["subscribe"] = run_subscribe``; it reads ``count``,
``concurrency`` as the number of consumers, ``connections``, ``message_size``,
``base`` and ``timeout`` from the options), and :func:`measure` with plain
arguments, also behind ``python -m activity_events.bench.subscribe``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import statistics
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from activity_events.bench.scenarios import Context

logger = logging.getLogger(__name__)

FILL_BATCH = 1000
FILL_CONCURRENCY = 4
FILL_ATTEMPTS = 5
SETTLE_POLL_SECONDS = 0.02
"""How often the server is asked whether everything is acknowledged, once all
events arrived; the rate's resolution at the end of the run."""
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class _BenchConsumer:
    """One Subscribe stream that acknowledges each response's deliveries immediately."""

    def __init__(self, stub: Any, open_: pb.SubscribeOpen, seen: set[str]) -> None:
        self.outbox: asyncio.Queue[pb.SubscribeRequest] = asyncio.Queue()
        self.outbox.put_nowait(pb.SubscribeRequest(open=open_))
        self.call = stub.Subscribe(self._requests())
        self.seen = seen
        self.received = 0
        self.duplicates = 0

    async def _requests(self) -> AsyncIterator[pb.SubscribeRequest]:
        while True:
            yield await self.outbox.get()

    async def run(self, done: asyncio.Event, total: int) -> None:
        async for response in self.call:
            if not response.deliveries:
                continue
            cursors = [d.cursor for d in response.deliveries]
            self.outbox.put_nowait(pb.SubscribeRequest(ack=pb.SubscribeAck(cursors=cursors)))
            self.received += len(cursors)
            before = len(self.seen)
            self.seen.update(cursors)
            self.duplicates += len(cursors) - (len(self.seen) - before)
            if len(self.seen) >= total:
                done.set()


async def _fill(stub: Any, deployment: int, count: int, size: int, rpc_timeout: float) -> None:
    body = "x" * max(0, size - 12)
    queue = list(range(1, count + 1, FILL_BATCH))

    async def worker() -> None:
        while queue:
            first = queue.pop()
            ids = range(first, min(count + 1, first + FILL_BATCH))
            events = [
                pb.EventRequest(id=i, deployment_id=deployment, message=f"{i:>11} {body}"[:size])
                for i in ids
            ]
            request = pb.CreateEventsRequest(events=events)
            for attempt in range(FILL_ATTEMPTS):
                try:
                    await stub.CreateEvents(request, timeout=rpc_timeout)
                    break
                except grpc.aio.AioRpcError as error:
                    # Creates are idempotent: a retry after UNAVAILABLE stores nothing twice.
                    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == FILL_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(worker() for _ in range(FILL_CONCURRENCY)))


async def _settled(subs: Any, name: str, rpc_timeout: float) -> bool:
    listed = await subs.ListSubscriptions(pb.ListSubscriptionsRequest(), timeout=rpc_timeout)
    for sub in listed.subscriptions:
        if sub.name == name:
            return bool(sub.pending == 0 and sub.lag == 0)
    return False


async def measure(
    target: str,
    *,
    events: int = 100_000,
    consumers: int = 4,
    connections: int = 4,
    max_in_flight: int = 1000,
    message_size: int = 32,
    deployment: int | None = None,
    deadline: float = 120.0,
) -> dict[str, Any]:
    """One run against the server at ``target``; a flat result dict.

    Uses its own deployment (random unless given) and subscription, both
    deleted afterwards. ``deadline`` bounds the run and each RPC, in seconds.
    """
    timeout = deadline
    deployment = deployment or random.randrange(100_000_000, 2_000_000_000)
    name = f"bench-{deployment}"
    channels = [
        grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        for _ in range(max(1, connections))
    ]
    stubs = [pb_grpc.SubscriptionsStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
    events_stub = pb_grpc.ActivityEventsStub(channels[0])  # type: ignore[no-untyped-call]
    running: list[_BenchConsumer] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        await _fill(events_stub, deployment, events, message_size, timeout)
        seen: set[str] = set()
        done = asyncio.Event()
        started = time.perf_counter()
        for k in range(consumers):
            open_ = pb.SubscribeOpen(
                subscription=name,
                consumer=f"bench-{k}",
                deployment_id=deployment,
                start=pb.START_POSITION_BEGINNING,
                max_in_flight=max_in_flight,
            )
            consumer = _BenchConsumer(stubs[k % len(stubs)], open_, seen)
            running.append(consumer)
            tasks.append(asyncio.create_task(consumer.run(done, events)))
        async with asyncio.timeout(timeout):
            waiter = asyncio.create_task(done.wait())
            finished, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if waiter not in finished:
                waiter.cancel()
                for task in finished:
                    task.result()  # a consumer stream failed: raise its error
                raise RuntimeError("a consumer stream ended early")
            received = time.perf_counter() - started
            while not await _settled(stubs[0], name, timeout):  # noqa: ASYNC110 - asks the server
                await asyncio.sleep(SETTLE_POLL_SECONDS)
        seconds = time.perf_counter() - started
        shares = [c.received for c in running]
        return {
            "scenario": "subscribe",
            "events": events,
            "consumers": consumers,
            "max_in_flight": max_in_flight,
            "message_size": message_size,
            "seconds": round(seconds, 3),
            "received_seconds": round(received, 3),
            "acked_events_per_s": round(events / seconds, 1),
            "duplicates": sum(c.duplicates for c in running),
            "min_share": min(shares),
            "max_share": max(shares),
        }
    finally:
        for consumer in running:
            consumer.call.cancel()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, Exception):
                await task
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stubs[0].DeleteSubscription(
                pb.DeleteSubscriptionRequest(subscription=name), timeout=timeout
            )
        with contextlib.suppress(grpc.aio.AioRpcError):
            await events_stub.DeleteDeployment(
                pb.DeleteDeploymentRequest(deployment_id=deployment), timeout=timeout
            )
        await asyncio.gather(*(ch.close(grace=None) for ch in channels))


async def run_subscribe(ctx: Context) -> dict[str, Any]:
    """The activity-bench scenario: ``options.concurrency`` consumers (4 by
    default when the scenario gets its own defaults) on ``options.base``."""
    o = ctx.options
    meter = ctx.meter()
    meter.start()
    result = await measure(
        o.target,
        events=o.count,
        consumers=o.concurrency,
        connections=o.connections,
        message_size=o.message_size,
        deployment=o.base,
        deadline=max(o.timeout, 60.0),
    )
    meter.stop()
    # the table's events/s column: events acknowledged per second
    return result | {"events_per_s": result["acked_events_per_s"]} | meter.fields()


SCENARIO_DEFAULTS: dict[str, Any] = {
    "count": 100_000,
    "concurrency": 4,
    "connections": 4,
    "deployments": 1,
}
"""What ``bench.options.DEFAULTS["subscribe"]`` should hold: the target is stated
for 4 consumers."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m activity_events.bench.subscribe",
        description="Events acknowledged per second through Subscribe (median of --runs).",
    )
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument("--message-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    async def runs() -> list[dict[str, Any]]:
        out = []
        for _ in range(args.runs):
            result = await measure(
                args.target,
                events=args.events,
                consumers=args.consumers,
                connections=args.connections,
                max_in_flight=args.max_in_flight,
                message_size=args.message_size,
            )
            print(json.dumps(result), flush=True)
            out.append(result)
        return out

    results = asyncio.run(runs())
    median = statistics.median(r["acked_events_per_s"] for r in results)
    print(
        json.dumps(
            {"scenario": "subscribe", "runs": len(results), "median_acked_events_per_s": median}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
