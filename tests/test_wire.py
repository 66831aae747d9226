"""The hand-assembled response bytes parse as the .proto says, field for field."""

from __future__ import annotations

import pytest

from activity_events.codec import wire
from activity_events.domain import events
from activity_events.domain.events import Cursor, StoredEvent
from activity_events.pb import activityevents_pb2 as pb


def stored(deployment: int, ms: int, seq: int, event_id: int, message: str) -> StoredEvent:
    event = pb.EventRequest(
        id=event_id,
        message=message,
        timestamp=pb.Timestamp(send=1, receive=2**62),
        deployment_id=deployment,
    )
    return StoredEvent(Cursor(deployment, ms, seq), event.SerializeToString())


@pytest.mark.parametrize(
    "n",
    [1, 127, 128, 300, 16383, 16384, 2**28 - 1, 2**28, 2**31 - 1, 2**62, 2**63 - 1, -1, -(2**63)],
)
def test_varint_matches_protobuf(n: int) -> None:
    assert pb.Timestamp(send=n).SerializeToString() == b"\x08" + wire.varint(n)


def test_varint_matches_protobuf_for_every_width() -> None:
    for shift in range(64):
        for n in (1 << shift, (1 << shift) - 1 or 1, (1 << shift) + 12345 % (1 << shift)):
            signed = n - (1 << 64) if n >= 1 << 63 else n
            assert pb.Timestamp(send=signed).SerializeToString() == b"\x08" + events.varint(n), n


def test_watch_response_round_trips() -> None:
    events = [
        stored(1, 1_700_000_000_000, 0, 1, "short"),
        stored(2**31 - 1, 1_700_000_000_001, 7, 2**31 - 1, "é" * 300),
        stored(3, 1, 2**40, 5, ""),
    ]
    body = b"".join(wire.watch_responses(events, 1 << 30))
    parsed = pb.WatchEventsResponse.FromString(body)
    assert not parsed.caught_up
    assert [e.cursor for e in parsed.events] == [str(e.cursor) for e in events]
    assert [e.event for e in parsed.events] == [e.decode() for e in events]
    # byte-identical to what the protobuf runtime would produce
    expected = pb.WatchEventsResponse(events=[e.to_proto() for e in events]).SerializeToString()
    assert body == expected


def test_caught_up_marker() -> None:
    parsed = pb.WatchEventsResponse.FromString(wire.CAUGHT_UP)
    assert parsed.caught_up and not parsed.events


def test_watch_responses_split_by_size_and_keep_order() -> None:
    events = [stored(1, 1000 + i, 0, i + 1, "x" * 400) for i in range(50)]
    messages = list(wire.watch_responses(events, max_bytes=2000))
    assert len(messages) > 1
    assert all(len(m) <= 2000 for m in messages)
    cursors = [e.cursor for m in messages for e in pb.WatchEventsResponse.FromString(m).events]
    assert cursors == [str(e.cursor) for e in events]
    # an event larger than the bound still goes out, alone
    big = [stored(1, 1, 0, 1, "y" * 5000), stored(1, 2, 0, 2, "z")]
    assert [
        len(pb.WatchEventsResponse.FromString(m).events) for m in wire.watch_responses(big, 2000)
    ] == [1, 1]
    assert list(wire.watch_responses([], 2000)) == []


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"index": 0, "id": 1, "deployment_id": 1, "outcome": pb.OUTCOME_CREATED},
        {
            "index": 999,
            "id": 2**31 - 1,
            "deployment_id": 2**31 - 1,
            "outcome": pb.OUTCOME_DUPLICATE,
            "cursor": "2147483647:1764370000000-3",
            "receive": 2**62 + 5,
        },
        {
            "index": 3,
            "id": -7,
            "deployment_id": -(2**31),
            "outcome": pb.OUTCOME_INVALID,
            "reason": "deployment_id: must be > 0, got -2147483648 — é",
        },
        {"index": 1, "id": 5, "deployment_id": 2, "outcome": pb.OUTCOME_CONFLICT, "reason": "x"},
    ],
)
def test_event_result_matches_the_protobuf_runtime(fields: dict[str, object]) -> None:
    expected = pb.CreateEventsResponse(results=[pb.EventResult(**fields)]).SerializeToString()  # type: ignore[arg-type]
    encoded = wire.event_result(
        int(fields.get("index", 0)),  # type: ignore[call-overload]
        int(fields.get("id", 0)),  # type: ignore[call-overload]
        int(fields.get("deployment_id", 0)),  # type: ignore[call-overload]
        int(fields.get("outcome", 0)),  # type: ignore[call-overload]
        cursor=str(fields.get("cursor", "")),
        reason=str(fields.get("reason", "")),
        receive=int(fields.get("receive", 0)),  # type: ignore[call-overload]
    )
    assert encoded == expected


@pytest.mark.parametrize(
    "case",
    [
        (0, 1, 1, pb.OUTCOME_CREATED, "1:1764370000000-0", 1_764_370_000_000_123_456),
        (999, 2**31 - 1, 2**31 - 1, pb.OUTCOME_DUPLICATE, "2147483647:1-2", 1),
        (5, 0, 3, pb.OUTCOME_CREATED, "", 0),
        (70_000, 12, 0, 0, "7:9-9", 2**63 - 1),
    ],
)
def test_stored_result_from_parts_matches_the_protobuf_runtime(
    case: tuple[int, int, int, int, str, int],
) -> None:
    index, event_id, deployment_id, outcome, cursor, receive = case
    expected = pb.CreateEventsResponse(
        results=[
            pb.EventResult(
                index=index,
                id=event_id,
                deployment_id=deployment_id,
                outcome=outcome,  # type: ignore[arg-type]
                cursor=cursor,
                receive=receive,
            )
        ]
    ).SerializeToString()
    encoded = wire.event_result_from_parts(
        index,
        event_id,
        wire.deployment_and_outcome(deployment_id, outcome),
        cursor.encode(),
        wire.receive_field(receive),
    )
    assert encoded == expected
