"""An old client, built from the legacy messages alone, must keep working.

The client here does not use the generated stubs: its descriptors are built
in code from the legacy contract's table (docs/api.md) (Deployment, EventRequest, Timestamp,
EventResponse with fields 1-3, and the two legacy RPCs) in a private
descriptor pool, exactly what a client compiled from the original .proto
knows. Responses are taken as raw bytes and parsed with those messages, so
the test sees the wire, not what our own stubs make of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

# The generated stubs are used only to cross-check answers; the legacy client never does.
from activity_events.pb import activityevents_pb2 as pb
from tests.support.streams import RPC_TIMEOUT, now_ns

Field = descriptor_pb2.FieldDescriptorProto
PACKAGE = "activityevents"
SERVICE = f"{PACKAGE}.ActivityEvents"


def _legacy_file() -> descriptor_pb2.FileDescriptorProto:
    """The original service's .proto, as a descriptor: only the legacy names and numbers."""
    file = descriptor_pb2.FileDescriptorProto(
        name="legacy/activityevents.proto", package=PACKAGE, syntax="proto3"
    )

    def message(name: str, *fields: tuple[str, int, int, str]) -> None:
        added = file.message_type.add(name=name)
        for field_name, number, kind, type_name in fields:
            field = added.field.add(
                name=field_name,
                number=number,
                type=kind,  # type: ignore[arg-type]
                label=Field.LABEL_OPTIONAL,
            )
            if type_name:
                field.type_name = type_name

    message("Deployment", ("id", 1, Field.TYPE_INT32, ""))
    message(
        "EventRequest",
        ("id", 1, Field.TYPE_INT32, ""),
        ("message", 2, Field.TYPE_STRING, ""),
        ("timestamp", 3, Field.TYPE_MESSAGE, f".{PACKAGE}.Timestamp"),
        ("deployment_id", 4, Field.TYPE_INT32, ""),
    )
    message("Timestamp", ("send", 1, Field.TYPE_INT64, ""), ("receive", 2, Field.TYPE_INT64, ""))
    message(
        "EventResponse",
        ("id", 1, Field.TYPE_INT32, ""),
        ("success", 2, Field.TYPE_BOOL, ""),
        ("execution_time", 3, Field.TYPE_INT64, ""),
    )
    service = file.service.add(name="ActivityEvents")
    service.method.add(
        name="CreateEvent",
        input_type=f".{PACKAGE}.EventRequest",
        output_type=f".{PACKAGE}.EventResponse",
    )
    service.method.add(
        name="ListEvents",
        input_type=f".{PACKAGE}.Deployment",
        output_type=f".{PACKAGE}.EventRequest",
        server_streaming=True,
    )
    return file


class LegacyClient:
    """The original client's view of the service: two RPCs, four messages, raw bytes back."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        self.pool.Add(_legacy_file())
        self.Deployment = self._message("Deployment")
        self.EventRequest = self._message("EventRequest")
        self.EventResponse = self._message("EventResponse")
        service = self.pool.FindServiceByName(SERVICE)
        create = service.methods_by_name["CreateEvent"]
        listing = service.methods_by_name["ListEvents"]
        # No response deserializer: the calls hand back the bytes on the wire.
        self._create = channel.unary_unary(
            f"/{SERVICE}/{create.name}",
            request_serializer=self.EventRequest.SerializeToString,
            response_deserializer=None,
        )
        self._list = channel.unary_stream(
            f"/{SERVICE}/{listing.name}",
            request_serializer=self.Deployment.SerializeToString,
            response_deserializer=None,
        )

    def _message(self, name: str) -> Any:
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))

    def event(self, deployment_id: int, event_id: int, message: str, send: int | None) -> Any:
        request = self.EventRequest(id=event_id, deployment_id=deployment_id, message=message)
        if send is not None:
            request.timestamp.send = send
        return request

    async def create_raw(self, request: Any) -> bytes:
        raw: bytes = await self._create(request, timeout=RPC_TIMEOUT)
        return raw

    async def create(self, request: Any) -> Any:
        return self.EventResponse.FromString(await self.create_raw(request))

    async def list_raw(self, deployment_id: int) -> list[bytes]:
        call = self._list(self.Deployment(id=deployment_id), timeout=RPC_TIMEOUT)
        return [raw async for raw in call]

    async def list(self, deployment_id: int) -> list[Any]:
        return [self.EventRequest.FromString(raw) for raw in await self.list_raw(deployment_id)]


def unknown_numbers(message: Message) -> set[int]:
    return {field.field_number for field in UnknownFieldSet(message)}


@pytest.fixture
def legacy(server: Any, channel_factory: Callable[..., grpc.aio.Channel]) -> LegacyClient:
    return LegacyClient(channel_factory(server.port))


def test_legacy_descriptors_know_only_the_legacy_fields() -> None:
    """Guard for the test itself: the legacy client must not secretly know new fields."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_legacy_file())
    response = pool.FindMessageTypeByName(f"{PACKAGE}.EventResponse")
    assert sorted(f.number for f in response.fields) == [1, 2, 3]
    assert [m.name for m in pool.FindServiceByName(SERVICE).methods] == [
        "CreateEvent",
        "ListEvents",
    ]


async def test_legacy_client_creates_and_lists(legacy: LegacyClient) -> None:
    send = now_ns() - 3_000_000_000
    raw = await legacy.create_raw(
        legacy.event(1, 1, "Deployment has been created successfully", send)
    )
    response = legacy.EventResponse.FromString(raw)
    assert response.id == 1
    assert response.success is True
    # Fields 4 and 5 (duplicate, cursor) are new: the old client skips them as unknown.
    assert unknown_numbers(response) <= {4, 5}
    assert 5 in unknown_numbers(response), "the cursor should be on the wire for new clients"

    raws = await legacy.list_raw(1)
    assert len(raws) == 1
    stored = legacy.EventRequest.FromString(raws[0])
    assert unknown_numbers(stored) == set(), "ListEvents must send only legacy fields"
    # Byte for byte: the legacy message re-serialises to exactly what was sent.
    assert stored.SerializeToString(deterministic=True) == raws[0]
    assert (stored.id, stored.deployment_id) == (1, 1)
    assert stored.message == "Deployment has been created successfully"
    assert stored.timestamp.send == send
    assert stored.timestamp.receive > send
    assert abs(stored.timestamp.receive - now_ns()) < 60 * 10**9
    assert response.execution_time == (stored.timestamp.receive - send) // 1_000_000
    assert response.execution_time >= 3000


async def test_legacy_list_all_deployments_in_arrival_order(legacy: LegacyClient) -> None:
    order = [(3, 1), (1, 1), (2, 1), (1, 2), (3, 2), (2, 2)]
    for deployment_id, event_id in order:
        response = await legacy.create(
            legacy.event(deployment_id, event_id, f"d{deployment_id} e{event_id}", now_ns())
        )
        assert response.success
        # Arrival order is by stream entry id (milliseconds), ties by deployment id:
        # keep creations a few milliseconds apart so arrival order is creation order.
        await asyncio.sleep(0.003)
    listed = await legacy.list(0)
    assert [(e.deployment_id, e.id) for e in listed] == order
    assert all(e.timestamp.receive > 0 for e in listed)
    only_one = await legacy.list(1)
    assert [(e.deployment_id, e.id) for e in only_one] == [(1, 1), (1, 2)]


async def test_legacy_duplicate_is_success_and_stored_once(legacy: LegacyClient) -> None:
    first = await legacy.create(legacy.event(5, 9, "same", now_ns()))
    again = await legacy.create(legacy.event(5, 9, "same", now_ns()))
    assert (first.id, first.success) == (9, True)
    assert (again.id, again.success) == (9, True)
    assert len(await legacy.list(5)) == 1


async def test_legacy_unknown_deployment_lists_nothing(legacy: LegacyClient) -> None:
    assert await legacy.list(424242) == []


async def test_legacy_event_without_timestamp(legacy: LegacyClient) -> None:
    raw = await legacy.create_raw(legacy.event(2, 1, "no timestamp", None))
    response = legacy.EventResponse.FromString(raw)
    assert response.success and response.id == 1
    assert response.execution_time == 0
    [stored] = await legacy.list(2)
    assert stored.timestamp.send == 0
    assert stored.timestamp.receive > 0


async def test_legacy_conflict_is_a_status_the_old_client_sees(legacy: LegacyClient) -> None:
    await legacy.create(legacy.event(4, 77, "first", now_ns()))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await legacy.create(legacy.event(4, 77, "different", now_ns()))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "77" in (raised.value.details() or "")


#: Values at protobuf varint-length boundaries and other edges of the legacy fields.
EDGE_IDS = [1, 127, 128, 16383, 16384, 2**21, 2**31 - 1]
EDGE_SENDS: list[int | None] = [None, 0, 1, 127, 128, 2**35, 1_764_000_000_000_000_000, 2**62]
EDGE_MESSAGES = ["", "a", "é", "部署 ✅ 🚀", "\x00", "x" * 127, "y" * 128, "z" * 20000]


async def test_stored_bytes_are_canonical_for_edge_values(
    legacy: LegacyClient, server: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """Whatever encodes the stored event, the legacy client must get exactly what the
    protobuf runtime would produce for the same message, for every edge value."""
    sent: dict[tuple[int, int], Any] = {}
    keys = [(d, i) for d in (1, 128, 2**31 - 1) for i in EDGE_IDS]
    cases = [
        (d, i, EDGE_SENDS[n % len(EDGE_SENDS)], EDGE_MESSAGES[n % len(EDGE_MESSAGES)])
        for n, (d, i) in enumerate(keys)
    ]
    for deployment, event_id, send, message in cases:
        request = legacy.event(deployment, event_id, message, send)
        response = legacy.EventResponse.FromString(await legacy.create_raw(request))
        assert response.success and response.id == event_id
        sent[(deployment, event_id)] = (send, message, response)

    for deployment in (1, 128, 2**31 - 1):
        raws = await legacy.list_raw(deployment)
        assert len(raws) == len(EDGE_IDS)
        for raw in raws:
            stored = legacy.EventRequest.FromString(raw)
            assert unknown_numbers(stored) == set()
            assert stored.SerializeToString(deterministic=True) == raw
            send, message, response = sent[(stored.deployment_id, stored.id)]
            assert stored.message == message
            assert stored.timestamp.send == (send or 0)
            assert stored.timestamp.receive > 0
            # A send of 0 counts as no send time (an empty Timestamp), like a missing one.
            expected = 0 if not send else (stored.timestamp.receive - send) // 1_000_000
            assert response.execution_time == expected
            # The generated stubs read the same bytes the same way.
            assert pb.EventRequest.FromString(raw).message == message

    # The new RPCs' answers parse with the runtime and carry the same events.
    stub_channel = channel_factory(server.port)
    watch = stub_channel.unary_stream(
        f"/{SERVICE}/WatchEvents",
        request_serializer=pb.WatchEventsRequest.SerializeToString,
        response_deserializer=None,
    )
    watched = [
        stored
        async for raw in watch(pb.WatchEventsRequest(deployment_id=0), timeout=RPC_TIMEOUT)
        for stored in pb.WatchEventsResponse.FromString(raw).events
    ]
    assert {(s.event.deployment_id, s.event.id) for s in watched} == set(sent)
    for stored in watched:
        send, message, _ = sent[(stored.event.deployment_id, stored.event.id)]
        assert (stored.event.message, stored.event.timestamp.send) == (message, send or 0)
        assert stored.cursor.startswith(f"{stored.event.deployment_id}:")


@pytest.mark.parametrize("send", [-1, -(2**63), 2**63 - 1])
async def test_extreme_send_times_never_fail_internally(legacy: LegacyClient, send: int) -> None:
    """A client clock far off (or garbage) must not crash the server or answer INTERNAL."""
    try:
        response = await legacy.create(legacy.event(3, 1, "odd clock", send))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "timestamp" in (error.details() or "") or "send" in (error.details() or "")
        return
    assert response.success
    [stored] = await legacy.list(3)
    assert stored.timestamp.send == send
