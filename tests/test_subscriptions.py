"""Durable subscriptions (activityevents.Subscriptions): consumer groups with
acknowledgements, redelivery after a visibility timeout, dead letters, replay,
competing consumers and flow control, against real Redis and real servers
(in-process, and ``activity-server`` processes where replicas or a killed
consumer process matter)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio

from activity_events.codec.wire import delivery_responses
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from activity_events.redis import keys
from activity_events.redis.groups import Delivered, SubscriptionConfig
from tests.support.streams import RPC_TIMEOUT, status_of, wait_until

#: Generous bound for events to reach a consumer.
DELIVERY_TIMEOUT = 10.0


async def create_many(
    stub: pb_grpc.ActivityEventsStub, deployment_id: int, first: int, count: int
) -> list[str]:
    """Store events first..first+count-1 in batches; their cursors in order."""
    cursors: list[str] = []
    for start in range(first, first + count, 500):
        ids = range(start, min(first + count, start + 500))
        request = pb.CreateEventsRequest(
            events=[
                pb.EventRequest(id=i, deployment_id=deployment_id, message=f"m{i}") for i in ids
            ]
        )
        response = await stub.CreateEvents(request, timeout=RPC_TIMEOUT)
        assert all(r.outcome == pb.OUTCOME_CREATED for r in response.results)
        cursors += [r.cursor for r in response.results]
    return cursors


class Consumer:
    """A Subscribe call: requests fed from a queue, responses collected by a task.

    ``deliveries`` holds (monotonic receive time, Delivery) in arrival order;
    ``auto_ack`` acknowledges each response's deliveries as they arrive.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        auto_ack: bool = False,
        never_ack: frozenset[int] = frozenset(),
        **open_fields: Any,
    ) -> None:
        self.stub = pb_grpc.SubscriptionsStub(channel)
        self.auto_ack = auto_ack
        self.never_ack = never_ack
        self.outbox: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        self.outbox.put_nowait(pb.SubscribeRequest(open=pb.SubscribeOpen(**open_fields)))
        self.call = self.stub.Subscribe(self._requests())
        self.opened: pb.SubscribeOpened | None = None
        self.deliveries: list[tuple[float, pb.Delivery]] = []
        self.ack_errors: list[pb.AckError] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[pb.SubscribeRequest]:
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            yield item

    async def _read(self) -> None:
        try:
            async for response in self.call:
                if response.HasField("opened"):
                    self.opened = response.opened
                now = time.monotonic()
                self.deliveries += [(now, d) for d in response.deliveries]
                self.ack_errors += response.ack_errors
                if self.auto_ack and response.deliveries:
                    chosen = response.deliveries
                    self.ack([d.cursor for d in chosen if d.event.id not in self.never_ack])
        except grpc.aio.AioRpcError as error:
            self.error = error
        finally:
            self.ended.set()

    @property
    def events(self) -> list[pb.Delivery]:
        return [d for _, d in self.deliveries]

    @property
    def ids(self) -> list[int]:
        return [d.event.id for _, d in self.deliveries]

    def ack(self, cursors: list[str]) -> None:
        self.outbox.put_nowait(pb.SubscribeRequest(ack=pb.SubscribeAck(cursors=cursors)))

    async def until(self, count: int, timeout: float = DELIVERY_TIMEOUT) -> list[pb.Delivery]:
        await wait_until(
            lambda: len(self.deliveries) >= count or self.ended.is_set(),
            timeout,
            message=f"{count} deliveries (have {len(self.deliveries)})",
        )
        assert self.error is None, self.error
        return self.events

    async def until_open(self, timeout: float = DELIVERY_TIMEOUT) -> pb.SubscribeOpened:
        await wait_until(lambda: self.opened is not None or self.ended.is_set(), timeout)
        assert self.error is None, self.error
        assert self.opened is not None
        return self.opened

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await asyncio.wait_for(self.task, RPC_TIMEOUT)


@pytest.fixture
async def consumers() -> AsyncIterator[Callable[..., Consumer]]:
    """Open Consumers; all are cancelled at teardown."""
    opened: list[Consumer] = []

    def build(channel: grpc.aio.Channel, **fields: Any) -> Consumer:
        consumer = Consumer(channel, **fields)
        opened.append(consumer)
        return consumer

    try:
        yield build
    finally:
        for consumer in opened:
            await consumer.close()


def subs_stub(channel: grpc.aio.Channel) -> pb_grpc.SubscriptionsStub:
    return pb_grpc.SubscriptionsStub(channel)


async def subscription(channel: grpc.aio.Channel, name: str) -> pb.Subscription:
    listed = await subs_stub(channel).ListSubscriptions(
        pb.ListSubscriptionsRequest(), timeout=RPC_TIMEOUT
    )
    found = [s for s in listed.subscriptions if s.name == name]
    assert found, f"subscription {name} not listed"
    return found[0]


# -- pure helpers ------------------------------------------------------------------


def test_group_start_delivers_exactly_the_events_after_the_floor() -> None:
    def config(d: int, ms: int, seq: int) -> SubscriptionConfig:
        return SubscriptionConfig("s", 0, 1000, 3, 0, d, ms, seq)

    assert config(0, -1, 0).group_start(5) == "0"
    # Cursor 5:100-3: deployment 5 and lower continue after 100-3, higher ones include it.
    assert config(5, 100, 3).group_start(5) == "100-3"
    assert config(5, 100, 3).group_start(2) == "100-3"
    assert config(5, 100, 3).group_start(7) == "100-2"
    assert config(5, 100, 0).group_start(7) == f"99-{2**64 - 1}"
    # "now" at ms 100: every deployment starts just before 100-0.
    assert config(0, 100, 0).group_start(1) == f"99-{2**64 - 1}"


def test_delivery_bytes_decode_as_subscribe_responses() -> None:
    payload = pb.EventRequest(id=7, message="x" * 300, deployment_id=3).SerializeToString()
    items = [
        Delivered(b"3:10-%d" % i, payload, i + 1, keys.events(3), b"10-%d" % i) for i in range(10)
    ]
    messages = list(delivery_responses(items, 1000))
    assert len(messages) > 1
    decoded = [d for m in messages for d in pb.SubscribeResponse.FromString(m).deliveries]
    assert [d.cursor for d in decoded] == [f"3:10-{i}" for i in range(10)]
    assert [d.delivery_count for d in decoded] == list(range(1, 11))
    assert all(d.event.message == "x" * 300 and d.event.id == 7 for d in decoded)


# -- delivery and acknowledgement ------------------------------------------------------


async def test_competing_consumers_split_the_events(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    a = consumers(channel, subscription="split", consumer="a", deployment_id=1, auto_ack=True,
                  max_in_flight=10)  # fmt: skip
    b = consumers(channel, subscription="split", consumer="b", deployment_id=1, auto_ack=True,
                  max_in_flight=10)  # fmt: skip
    await a.until_open()
    await b.until_open()
    cursors = await create_many(stub, 1, 1, 300)
    await wait_until(lambda: len(a.deliveries) + len(b.deliveries) >= 300, DELIVERY_TIMEOUT)
    got = [d.cursor for d in a.events + b.events]
    assert sorted(got) == sorted(cursors), "every event once, none twice"
    assert a.events and b.events, "both consumers got a share"
    for consumer in (a, b):  # each consumer sees its share in stream order
        ids = consumer.ids
        assert ids == sorted(ids)
    await wait_until(
        lambda: _pending_is(channel, "split", 0), DELIVERY_TIMEOUT, message="all acknowledged"
    )


async def _pending_is(channel: grpc.aio.Channel, name: str, pending: int, lag: int = 0) -> bool:
    info = await subscription(channel, name)
    return info.pending == pending and info.lag == lag


async def test_two_subscriptions_each_get_every_event(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    cursors = await create_many(stub, 2, 1, 120)
    first = consumers(channel, subscription="audit", deployment_id=2, auto_ack=True)
    second = consumers(channel, subscription="notify", deployment_id=2, auto_ack=True)
    more = await create_many(stub, 2, 121, 30)
    await first.until(150)
    await second.until(150)
    assert [d.cursor for d in first.events] == cursors + more
    assert [d.cursor for d in second.events] == cursors + more
    assert all(d.delivery_count == 1 for d in first.events + second.events)


async def test_flow_control_never_exceeds_max_in_flight(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    await create_many(stub, 3, 1, 100)
    consumer = consumers(channel, subscription="slow", deployment_id=3, max_in_flight=7)
    await consumer.until(7)
    await asyncio.sleep(0.5)
    assert len(consumer.deliveries) == 7, "no more than max_in_flight unacknowledged"
    consumer.ack([d.cursor for d in consumer.events[:3]])
    await consumer.until(10)
    await asyncio.sleep(0.5)
    assert len(consumer.deliveries) == 10
    acked = 3
    for _ in range(200):  # bounded: ack one by one until everything arrived
        if acked == len(consumer.deliveries) == 100:
            break
        await consumer.until(acked + 1)
        outstanding = len(consumer.deliveries) - acked
        assert outstanding <= 7
        consumer.ack([consumer.events[acked].cursor])
        acked += 1
    assert consumer.ids == list(range(1, 101))


async def test_restarted_subscriber_gets_everything_it_missed(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    before = await create_many(stub, 4, 1, 10)
    first = consumers(channel, subscription="restart", consumer="worker", deployment_id=4,
                      start=pb.START_POSITION_NOW, auto_ack=True)  # fmt: skip
    await first.until_open()
    live = await create_many(stub, 4, 11, 5)
    await first.until(5)
    assert [d.cursor for d in first.events] == live, "NOW skips older events"
    await wait_until(lambda: _pending_is(channel, "restart", 0), DELIVERY_TIMEOUT)
    await first.close()
    missed = await create_many(stub, 4, 16, 1000)
    info = await subscription(channel, "restart")
    assert info.lag == 1000 and info.pending == 0
    second = consumers(channel, subscription="restart", consumer="worker", deployment_id=4,
                       auto_ack=True, max_in_flight=200)  # fmt: skip
    events = await second.until(1000)
    await asyncio.sleep(0.3)
    assert [d.cursor for d in second.events] == missed
    assert not set(before) & {d.cursor for d in events}
    await wait_until(lambda: _pending_is(channel, "restart", 0), DELIVERY_TIMEOUT)


async def test_lag_and_pending_return_to_zero_when_caught_up(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    await create_many(stub, 5, 1, 50)
    consumer = consumers(channel, subscription="lagging", deployment_id=5, max_in_flight=10)
    await consumer.until(10)
    info = await subscription(channel, "lagging")
    assert (info.lag, info.pending, info.consumers) == (40, 10, 1)
    registry = server.registry
    assert registry.get_sample_value("activity_subscription_lag", {"subscription": "lagging"}) == 40
    for _ in range(20):  # bounded: ack whatever is outstanding until all 50 are through
        consumer.ack([d.cursor for d in consumer.events[-10:]])
        if len(consumer.deliveries) == 50:
            break
        await consumer.until(min(50, len(consumer.deliveries) + 10))
    await wait_until(lambda: _pending_is(channel, "lagging", 0), DELIVERY_TIMEOUT)
    assert registry.get_sample_value("activity_subscription_lag", {"subscription": "lagging"}) == 0
    assert (
        registry.get_sample_value("activity_subscription_pending", {"subscription": "lagging"}) == 0
    )
    assert (
        registry.get_sample_value(
            "activity_subscription_acknowledged_total", {"subscription": "lagging"}
        )
        == 50
    )
    # once the replica's last consumer leaves, it stops reporting the state gauges
    await consumer.close()
    labels = {"subscription": "lagging"}
    await wait_until(
        lambda: registry.get_sample_value("activity_subscription_lag", labels) is None,
        DELIVERY_TIMEOUT,
    )
    assert registry.get_sample_value("activity_subscription_pending", labels) is None
    assert registry.get_sample_value("activity_subscription_consumers", labels) == 0


async def test_poison_event_is_dead_lettered_and_can_be_replayed(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    cursors = await create_many(stub, 9, 1, 10)
    consumer = consumers(channel, subscription="poison", consumer="picky", deployment_id=9,
                         visibility_timeout_ms=300, max_deliveries=3, auto_ack=True,
                         never_ack=frozenset({5}))  # fmt: skip
    await consumer.until(12)
    await asyncio.sleep(1.0)  # a 4th delivery would come within ~0.4 s
    poison = [d for d in consumer.events if d.event.id == 5]
    assert [d.delivery_count for d in poison] == [1, 2, 3]
    assert {d.cursor for d in poison} == {cursors[4]}
    assert sorted(Counter(consumer.ids).items()) == [(i, 3 if i == 5 else 1) for i in range(1, 11)]

    subs = subs_stub(channel)
    listed = await subs.ListDeadLetters(
        pb.ListDeadLettersRequest(subscription="poison"), timeout=RPC_TIMEOUT
    )
    assert len(listed.dead_letters) == 1 and not listed.next_page_token
    letter = listed.dead_letters[0]
    assert letter.event.cursor == cursors[4] and letter.event.event.id == 5
    assert letter.event.event.message == "m5"
    assert (letter.delivery_count, letter.consumer) == (3, "picky")
    info = await subscription(channel, "poison")
    assert (info.dead_letters, info.pending, info.lag) == (1, 0, 0)
    labels = {"subscription": "poison"}
    assert (
        server.registry.get_sample_value("activity_subscription_dead_lettered_total", labels) == 1
    )
    assert server.registry.get_sample_value("activity_subscription_redeliveries_total", labels) == 2

    consumer.never_ack = frozenset()
    replayed = await subs.ReplayDeadLetters(
        pb.ReplayDeadLettersRequest(subscription="poison", ids=[letter.id]), timeout=RPC_TIMEOUT
    )
    assert replayed.replayed == 1
    await consumer.until(13)
    again = consumer.events[12]
    assert (again.cursor, again.event.id, again.delivery_count) == (cursors[4], 5, 1)
    await wait_until(lambda: _pending_is(channel, "poison", 0), DELIVERY_TIMEOUT)
    info = await subscription(channel, "poison")
    assert info.dead_letters == 0
    listed = await subs.ListDeadLetters(
        pb.ListDeadLettersRequest(subscription="poison"), timeout=RPC_TIMEOUT
    )
    assert not listed.dead_letters


async def test_dead_letters_page_and_replay_all(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    await create_many(stub, 10, 1, 5)
    consumer = consumers(channel, subscription="dlq-pages", deployment_id=10,
                         visibility_timeout_ms=100, max_deliveries=1, auto_ack=True,
                         never_ack=frozenset(range(1, 6)))  # fmt: skip
    await consumer.until_open()
    subs = subs_stub(channel)

    async def dead() -> int:
        return (await subscription(channel, "dlq-pages")).dead_letters

    await wait_until(lambda: _equals(dead(), 5), DELIVERY_TIMEOUT, message="5 dead letters")
    seen: list[int] = []
    token = ""
    for _ in range(5):  # bounded: at most 5 pages of 2
        page = await subs.ListDeadLetters(
            pb.ListDeadLettersRequest(subscription="dlq-pages", page_size=2, page_token=token),
            timeout=RPC_TIMEOUT,
        )
        seen += [d.event.event.id for d in page.dead_letters]
        token = page.next_page_token
        if not token:
            break
    assert seen == [1, 2, 3, 4, 5]
    consumer.never_ack = frozenset()
    replayed = await subs.ReplayDeadLetters(
        pb.ReplayDeadLettersRequest(subscription="dlq-pages"), timeout=RPC_TIMEOUT
    )
    assert replayed.replayed == 5
    await consumer.until(10)
    assert consumer.ids[5:] == [1, 2, 3, 4, 5]
    await wait_until(lambda: _equals(dead(), 0), DELIVERY_TIMEOUT)


async def _equals(awaitable: Any, expected: int) -> bool:
    return bool(await awaitable == expected)


async def test_all_deployments_subscription_keeps_per_deployment_order(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    early = {d: await create_many(stub, d, 1, 20) for d in (21, 22)}
    consumer = consumers(channel, subscription="everything", deployment_id=0, auto_ack=True,
                         max_in_flight=15)  # fmt: skip
    await consumer.until(40)
    late = {23: await create_many(stub, 23, 1, 20), 21: await create_many(stub, 21, 21, 10)}
    await consumer.until(70)
    await asyncio.sleep(0.3)
    assert len(consumer.deliveries) == 70
    by_deployment: dict[int, list[str]] = {}
    for delivery in consumer.events:
        by_deployment.setdefault(delivery.event.deployment_id, []).append(delivery.cursor)
    assert by_deployment == {21: early[21] + late[21], 22: early[22], 23: late[23]}
    await wait_until(lambda: _pending_is(channel, "everything", 0), DELIVERY_TIMEOUT)


async def test_start_after_a_cursor(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    cursors = await create_many(stub, 24, 1, 10)
    consumer = consumers(channel, subscription="from-cursor", deployment_id=24,
                         start=pb.START_POSITION_CURSOR, start_cursor=cursors[6],
                         auto_ack=True)  # fmt: skip
    await consumer.until(3)
    await asyncio.sleep(0.3)
    assert [d.cursor for d in consumer.events] == cursors[7:]


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"subscription": "ok", "start": pb.START_POSITION_CURSOR, "start_cursor": "nope"},
         "start_cursor"),
        ({"subscription": "ok", "deployment_id": 3, "start": pb.START_POSITION_CURSOR,
          "start_cursor": "4:1-0"}, "start_cursor"),
        ({"subscription": "ok", "start": pb.START_POSITION_CURSOR}, "start_cursor"),
        ({"subscription": "ok", "start_cursor": "1:1-0"}, "start_cursor"),
        ({"subscription": "ok", "start": 99}, "start"),
        ({"subscription": "bad name{x}"}, "subscription"),
        ({"subscription": ""}, "subscription"),
        ({"subscription": "ok", "deployment_id": -1}, "deployment_id"),
        ({"subscription": "ok", "max_in_flight": -5}, "max_in_flight"),
        ({"subscription": "ok", "visibility_timeout_ms": 1}, "visibility_timeout_ms"),
    ],
)  # fmt: skip
async def test_invalid_open_fails_the_call(
    server: Any, channel: grpc.aio.Channel, consumers: Any, fields: dict[str, Any], named: str
) -> None:
    consumer = consumers(channel, **fields)
    await asyncio.wait_for(consumer.ended.wait(), RPC_TIMEOUT)
    assert consumer.error is not None
    assert consumer.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (consumer.error.details() or "")


async def test_first_message_must_open(server: Any, channel: grpc.aio.Channel) -> None:
    async def requests() -> AsyncIterator[pb.SubscribeRequest]:
        yield pb.SubscribeRequest(ack=pb.SubscribeAck(cursors=["1:1-0"]))

    call = subs_stub(channel).Subscribe(requests(), timeout=RPC_TIMEOUT)
    error = await status_of(_drain(call))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "open" in (error.details() or "")


async def _drain(call: Any) -> list[Any]:
    return [message async for message in call]


async def test_unknown_and_foreign_acks_are_reported_and_the_stream_stays_up(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    a = consumers(channel, subscription="acks", consumer="a", deployment_id=25, max_in_flight=1)
    await a.until_open()
    b = consumers(channel, subscription="acks", consumer="b", deployment_id=25, max_in_flight=1)
    await b.until_open()
    await create_many(stub, 25, 1, 2)
    await a.until(1)
    await b.until(1)
    foreign = a.events[0].cursor
    b.ack([foreign, "25:1-0", "garbage"])
    await wait_until(lambda: len(b.ack_errors) == 3, DELIVERY_TIMEOUT, message="3 ack errors")
    assert [e.cursor for e in b.ack_errors] == [foreign, "25:1-0", "garbage"]
    assert all("INVALID_ARGUMENT" in e.reason for e in b.ack_errors)
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for e in b.ack_errors)
    # The stream is still up: b's own ack works and it gets the next event.
    b.ack([b.events[0].cursor])
    await create_many(stub, 25, 3, 1)
    await b.until(2)
    assert b.error is None and not b.ended.is_set()
    assert b.events[1].event.id == 3
    # a's event was not acknowledged by b's foreign ack.
    info = await subscription(channel, "acks")
    assert info.pending == 2


async def test_delete_subscription(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any,
    redis_client: redis_asyncio.Redis,
) -> None:  # fmt: skip
    subs = subs_stub(channel)
    error = await status_of(
        subs.DeleteSubscription(pb.DeleteSubscriptionRequest(subscription="nobody"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await create_many(stub, 26, 1, 3)
    consumer = consumers(channel, subscription="doomed", deployment_id=26)
    await consumer.until(3)
    deleted = await subs.DeleteSubscription(
        pb.DeleteSubscriptionRequest(subscription="doomed"), timeout=RPC_TIMEOUT
    )
    assert deleted.deleted_dead_letters == 0
    await asyncio.wait_for(consumer.ended.wait(), RPC_TIMEOUT)
    assert consumer.error is not None and consumer.error.code() == grpc.StatusCode.NOT_FOUND
    groups = await redis_client.xinfo_groups(keys.events(26))
    assert not groups
    listed = await subs.ListSubscriptions(pb.ListSubscriptionsRequest(), timeout=RPC_TIMEOUT)
    assert "doomed" not in [s.name for s in listed.subscriptions]
    error = await status_of(
        subs.DeleteSubscription(pb.DeleteSubscriptionRequest(subscription="doomed"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


# -- processes: a killed consumer, consumers on two replicas ------------------------------

CONSUMER_SCRIPT = textwrap.dedent(
    """
    import queue, sys
    import grpc
    from activity_events.pb import activityevents_pb2 as pb, activityevents_pb2_grpc as pb_grpc

    port, acks = int(sys.argv[1]), int(sys.argv[2])
    outbox = queue.Queue()
    outbox.put(pb.SubscribeRequest(open=pb.SubscribeOpen(
        subscription="jobs", consumer="doomed", deployment_id=7, max_in_flight=20,
        visibility_timeout_ms=int(sys.argv[3]))))

    def requests():
        while True:
            yield outbox.get()

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SubscriptionsStub(channel)
    seen = 0
    for response in stub.Subscribe(requests()):
        for delivery in response.deliveries:
            seen += 1
            if seen <= acks:
                outbox.put(pb.SubscribeRequest(ack=pb.SubscribeAck(cursors=[delivery.cursor])))
                print("ACK", delivery.cursor, flush=True)
            else:
                print("HOLD", delivery.cursor, flush=True)
    """
)


class ConsumerProcess:
    """CONSUMER_SCRIPT as a child process, its output lines collected by a thread."""

    def __init__(self, port: int, acks: int, visibility_ms: int, cwd: Path) -> None:
        import threading  # noqa: PLC0415

        self.process = subprocess.Popen(
            [sys.executable, "-c", CONSUMER_SCRIPT, str(port), str(acks), str(visibility_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={k: v for k, v in os.environ.items() if not k.startswith(("ACTIVITY_", "OTEL_"))},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def cursors(self, kind: str) -> list[str]:
        return [line.split()[1] for line in self.lines if line.startswith(kind + " ")]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.reader.join(timeout=2)


@pytest.mark.slow
async def test_killed_consumer_events_go_to_another_consumer(
    redis_server: Any, server_process_factory: Any, channel_factory: Any, tmp_path: Path,
    consumers: Any,
) -> None:  # fmt: skip
    visibility_ms = 5000  # margin for the survivor to get its 75 first on a busy machine
    server = server_process_factory(
        {"ACTIVITY_REDIS_URL": redis_server.url, "ACTIVITY_HUB_BLOCK_MS": "200"}
    ).start()
    channel = channel_factory(server.port)
    stub = pb_grpc.ActivityEventsStub(channel)
    cursors = await create_many(stub, 7, 1, 100)
    started = time.monotonic()
    doomed = ConsumerProcess(server.port, 5, visibility_ms, tmp_path)
    try:
        # max_in_flight 20, 5 acknowledged: it ends up holding 20 of the first 25.
        await wait_until(lambda: len(doomed.lines) >= 25, DELIVERY_TIMEOUT, message="25 lines")
        await asyncio.sleep(0.3)
        acked, held = doomed.cursors("ACK"), doomed.cursors("HOLD")
        assert (acked + held, len(held)) == (cursors[:25], 20)
        survivor = consumers(channel, subscription="jobs", consumer="survivor", deployment_id=7,
                             max_in_flight=100, auto_ack=True)  # fmt: skip
        await survivor.until(75)
        # While the doomed consumer holds its events they go to nobody else.
        assert [d.cursor for d in survivor.events] == cursors[25:]
        doomed.kill()
        killed = time.monotonic()
        await survivor.until(95, timeout=visibility_ms / 1000 + DELIVERY_TIMEOUT)
        await asyncio.sleep(0.5)
        redelivered = survivor.deliveries[75:]
        assert sorted(d.cursor for _, d in redelivered) == sorted(held), "none lost"
        assert all(d.delivery_count == 2 for _, d in redelivered)
        assert all(t >= started + visibility_ms / 1000 for t, _ in redelivered)
        assert not set(acked) & {d.cursor for d in survivor.events}, "acked ones stay done"
        assert len(survivor.deliveries) == 95
        assert killed < min(t for t, _ in redelivered)
        await wait_until(lambda: _pending_is(channel, "jobs", 0), DELIVERY_TIMEOUT)
    finally:
        doomed.kill()


@pytest.mark.slow
async def test_consumers_on_two_replicas_share_one_group(
    redis_server: Any, server_process_factory: Any, channel_factory: Any, consumers: Any
) -> None:
    env = {"ACTIVITY_REDIS_URL": redis_server.url, "ACTIVITY_HUB_BLOCK_MS": "200"}
    first = server_process_factory(env).start()
    second = server_process_factory(env).start()
    channels = [channel_factory(first.port), channel_factory(second.port)]
    stub = pb_grpc.ActivityEventsStub(channels[0])
    left = consumers(channels[0], subscription="shared", consumer="left", deployment_id=8,
                     auto_ack=True, max_in_flight=20)  # fmt: skip
    right = consumers(channels[1], subscription="shared", consumer="right", deployment_id=8,
                      auto_ack=True, max_in_flight=20)  # fmt: skip
    await left.until_open()
    await right.until_open()
    cursors = await create_many(stub, 8, 1, 400)
    await wait_until(lambda: len(left.deliveries) + len(right.deliveries) >= 400, DELIVERY_TIMEOUT)
    await asyncio.sleep(0.3)
    got = [d.cursor for d in left.events + right.events]
    assert sorted(got) == sorted(cursors) and len(got) == 400
    assert left.events and right.events
    await wait_until(lambda: _pending_is(channels[1], "shared", 0), DELIVERY_TIMEOUT)


async def test_server_stop_ends_consumers_cleanly(
    app_factory: Any, channel_factory: Any, consumers: Any
) -> None:
    app = await app_factory()
    channel = channel_factory(app.port)
    stub = pb_grpc.ActivityEventsStub(channel)
    await create_many(stub, 27, 1, 3)
    consumer = consumers(channel, subscription="stopping", deployment_id=27)
    await consumer.until(3)
    await asyncio.wait_for(app.stop(), RPC_TIMEOUT)
    await asyncio.wait_for(consumer.ended.wait(), RPC_TIMEOUT)
    assert consumer.error is None, "the stream ends with OK at shutdown"


async def test_open_on_another_deployment_is_refused(
    server: Any, channel: grpc.aio.Channel, consumers: Any
) -> None:
    first = consumers(channel, subscription="pinned", deployment_id=28)
    await first.until_open()
    other = consumers(channel, subscription="pinned", deployment_id=29)
    await asyncio.wait_for(other.ended.wait(), RPC_TIMEOUT)
    assert other.error is not None
    assert other.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deployment_id" in (other.error.details() or "")


async def test_settings_given_at_open_update_the_subscription(
    server: Any, channel: grpc.aio.Channel, consumers: Any
) -> None:
    first = consumers(channel, subscription="tunable", deployment_id=30)
    opened = await first.until_open()
    assert (opened.subscription.visibility_timeout_ms, opened.subscription.max_deliveries) == (
        30_000,
        5,
    )
    assert opened.consumer.startswith("consumer-"), "an empty consumer name gets one"
    second = consumers(channel, subscription="tunable", deployment_id=30, consumer="b",
                       visibility_timeout_ms=500, max_deliveries=2)  # fmt: skip
    opened = await second.until_open()
    assert (opened.subscription.visibility_timeout_ms, opened.subscription.max_deliveries) == (
        500,
        2,
    )
    info = await subscription(channel, "tunable")
    assert (info.visibility_timeout_ms, info.max_deliveries) == (500, 2)


async def test_all_deployments_dead_letters_filter_and_replay_by_deployment(
    server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub, consumers: Any
) -> None:
    for d in (31, 32):
        await create_many(stub, d, 1, 2)
    consumer = consumers(channel, subscription="wide", deployment_id=0,
                         visibility_timeout_ms=100, max_deliveries=1, auto_ack=True,
                         never_ack=frozenset({2}))  # fmt: skip
    await consumer.until_open()
    subs = subs_stub(channel)

    async def dead(deployment: int = 0) -> list[pb.DeadLetter]:
        request = pb.ListDeadLettersRequest(subscription="wide", deployment_id=deployment)
        return list((await subs.ListDeadLetters(request, timeout=RPC_TIMEOUT)).dead_letters)

    await wait_until(lambda: _length_is(dead(), 2), DELIVERY_TIMEOUT, message="2 dead letters")
    assert sorted((d.event.event.deployment_id, d.event.event.id) for d in await dead()) == [
        (31, 2),
        (32, 2),
    ]
    assert [d.event.event.deployment_id for d in await dead(32)] == [32]
    consumer.never_ack = frozenset()
    replayed = await subs.ReplayDeadLetters(
        pb.ReplayDeadLettersRequest(subscription="wide", deployment_id=32), timeout=RPC_TIMEOUT
    )
    assert replayed.replayed == 1
    await consumer.until(5)
    assert (consumer.events[4].event.deployment_id, consumer.events[4].event.id) == (32, 2)
    await wait_until(lambda: _length_is(dead(), 1), DELIVERY_TIMEOUT)
    await wait_until(lambda: _pending_is(channel, "wide", 0), DELIVERY_TIMEOUT)
    error = await status_of(subs.ListDeadLetters(pb.ListDeadLettersRequest(subscription="unknown")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def _length_is(awaitable: Any, expected: int) -> bool:
    return len(await awaitable) == expected


# -- Redis Cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.support.cluster import RedisClusterProcesses  # noqa: PLC0415

    processes = RedisClusterProcesses(Path(tmp_path_factory.mktemp("cluster")))
    try:
        yield processes.start()
    finally:
        processes.stop()


@pytest.mark.slow
async def test_subscription_on_all_deployments_across_cluster_slots(
    cluster: Any, app_factory: Any, channel_factory: Any, consumers: Any
) -> None:
    for node in cluster.nodes:
        cluster.client(node).flushall()
    app = await app_factory(redis_url=cluster.url)
    channel = channel_factory(app.port)
    stub = pb_grpc.ActivityEventsStub(channel)
    deployments = range(41, 53)
    written = {d: await create_many(stub, d, 1, 10) for d in deployments}
    assert len({cluster.owner(_slot(keys.events(d))).port for d in deployments}) > 1
    a = consumers(channel, subscription="cluster-wide", consumer="a", deployment_id=0,
                  auto_ack=True, never_ack=frozenset({10}), max_in_flight=25,
                  visibility_timeout_ms=200, max_deliveries=2)  # fmt: skip
    b = consumers(channel, subscription="cluster-wide", consumer="b", deployment_id=0,
                  auto_ack=True, never_ack=frozenset({10}), max_in_flight=25)  # fmt: skip
    await a.until_open()
    await b.until_open()
    written[53] = await create_many(stub, 53, 1, 10)  # a deployment new to the subscription
    first = {d.cursor for d in a.events + b.events if d.delivery_count == 1}
    await wait_until(
        lambda: len({d.cursor for d in a.events + b.events if d.delivery_count == 1}) == 130,
        DELIVERY_TIMEOUT,
        message="130 first deliveries",
    )
    first = [d.cursor for d in a.events + b.events if d.delivery_count == 1]
    assert sorted(first) == sorted(c for cursors in written.values() for c in cursors)
    subs = subs_stub(channel)

    async def dead() -> int:
        return (await subscription(channel, "cluster-wide")).dead_letters

    await wait_until(lambda: _equals(dead(), 13), DELIVERY_TIMEOUT, message="13 dead letters")
    a.never_ack = b.never_ack = frozenset()
    replayed = await subs.ReplayDeadLetters(
        pb.ReplayDeadLettersRequest(subscription="cluster-wide"), timeout=RPC_TIMEOUT
    )
    assert replayed.replayed == 13
    await wait_until(lambda: _equals(dead(), 0), DELIVERY_TIMEOUT)
    await wait_until(lambda: _pending_is(channel, "cluster-wide", 0), DELIVERY_TIMEOUT)
    deleted = await subs.DeleteSubscription(
        pb.DeleteSubscriptionRequest(subscription="cluster-wide"), timeout=RPC_TIMEOUT
    )
    assert deleted.deleted_dead_letters == 0


def _slot(key: str) -> int:
    from redis.crc import key_slot  # noqa: PLC0415

    return int(key_slot(key.encode()))


async def test_redis_unreachable_ends_consumers_with_unavailable(
    redis_server: Any, server: Any, channel: grpc.aio.Channel, stub: pb_grpc.ActivityEventsStub,
    consumers: Any,
) -> None:  # fmt: skip
    await create_many(stub, 33, 1, 5)
    consumer = consumers(channel, subscription="fragile", deployment_id=33,
                         visibility_timeout_ms=500)  # fmt: skip
    await consumer.until(5)
    redis_server.pause()
    try:
        paused = time.monotonic()
        await asyncio.wait_for(consumer.ended.wait(), 10)
        assert time.monotonic() - paused < 6
        assert consumer.error is not None
        assert consumer.error.code() == grpc.StatusCode.UNAVAILABLE
        error = await status_of(
            subs_stub(channel).ListSubscriptions(pb.ListSubscriptionsRequest(), timeout=10)
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        redis_server.resume()
    # Back: the unacknowledged events come again (after their visibility timeout).
    again = consumers(channel, subscription="fragile", deployment_id=33, auto_ack=True)
    events = await again.until(5, timeout=DELIVERY_TIMEOUT + 5)
    assert [d.event.id for d in events] == [1, 2, 3, 4, 5]
    # At least the second delivery: a claim the old stream had already sent may
    # have run when Redis came back, which counts as one more.
    assert all(d.delivery_count >= 2 for d in events)
    await asyncio.sleep(0.5)
    assert len(again.deliveries) == 5


async def test_consumers_per_replica_are_capped(
    app_factory: Any, channel_factory: Any, consumers: Any
) -> None:
    app = await app_factory(max_consumers=2)
    channel = channel_factory(app.port)
    kept = [consumers(channel, subscription="capped", deployment_id=34) for _ in range(2)]
    for consumer in kept:
        await consumer.until_open()
    refused = consumers(channel, subscription="capped", deployment_id=34)
    await asyncio.wait_for(refused.ended.wait(), RPC_TIMEOUT)
    assert refused.error is not None
    assert refused.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await kept[0].close()
    await asyncio.sleep(0.2)
    again = consumers(channel, subscription="capped", deployment_id=34)
    await again.until_open()
