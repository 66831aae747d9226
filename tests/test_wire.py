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
