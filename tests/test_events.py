"""Domain rules: cursor parsing and ordering, event validation, payload layout."""

from __future__ import annotations

import pytest

from activity_events.domain.errors import InvalidArgument
from activity_events.domain.events import Cursor, validate_new
from activity_events.pb import activityevents_pb2 as pb


def test_cursor_text_round_trip() -> None:
    cursor = Cursor(42, 1_764_370_000_000, 3)
    assert str(cursor) == "42:1764370000000-3"
    assert Cursor.parse(str(cursor), deployment_id=42) == cursor
    assert Cursor.parse(str(cursor), deployment_id=0) == cursor
    assert Cursor.parse("1764370000000-3", deployment_id=42) == cursor


@pytest.mark.parametrize(
    ("text", "deployment", "needle"),
    [
        ("", 1, "malformed"),
        ("abc", 1, "malformed"),
        ("1:2", 1, "malformed"),
        ("1:2-3-4", 1, "malformed"),
        ("-1:2-3", 1, "malformed"),
        ("7:1-0", 8, "belongs to deployment 7"),
        ("1-0", 0, "full cursor"),
        ("0:1-0", 0, "invalid deployment"),
        ("1:99999999999999999999-0", 1, "out of range"),
    ],
)
def test_bad_cursors_name_the_field(text: str, deployment: int, needle: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Cursor.parse(text, deployment_id=deployment)
    assert info.value.field == "after"
    assert needle in str(info.value)


def test_cursor_order_is_entry_id_then_deployment() -> None:
    a, b, c = Cursor(2, 10, 0), Cursor(1, 10, 1), Cursor(1, 11, 0)
    assert sorted([c, b, a]) == [a, b, c]
    assert Cursor(1, 10, 0) < Cursor(2, 10, 0)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.EventRequest(id=1, deployment_id=0), "deployment_id"),
        (pb.EventRequest(id=1, deployment_id=-5), "deployment_id"),
        (pb.EventRequest(id=-1, deployment_id=1), "id"),
        (pb.EventRequest(id=1, deployment_id=1, message="x" * 11), "message"),
        (pb.EventRequest(id=1, deployment_id=1, message="é" * 6), "message"),
    ],
)
def test_validation_names_the_field(request_: pb.EventRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_new(request_, max_message_bytes=10)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_identity_ignores_send_time_and_payload_parses_with_the_id_prepended() -> None:
    first = validate_new(
        pb.EventRequest(id=9, deployment_id=3, message="m", timestamp=pb.Timestamp(send=5)),
        max_message_bytes=100,
    )
    retry = validate_new(
        pb.EventRequest(id=9, deployment_id=3, message="m", timestamp=pb.Timestamp(send=6)),
        max_message_bytes=100,
    )
    assert first.digest() == retry.digest()
    assert (
        first.digest()
        != validate_new(
            pb.EventRequest(id=9, deployment_id=3, message="n"), max_message_bytes=100
        ).digest()
    )
    body = b"\x08\x09" + first.payload_without_id(receive_ns=77)
    event = pb.EventRequest.FromString(body)
    assert (event.id, event.message, event.deployment_id) == (9, "m", 3)
    assert (event.timestamp.send, event.timestamp.receive) == (5, 77)


def test_execution_time_is_zero_without_timestamp() -> None:
    bare = validate_new(pb.EventRequest(id=1, deployment_id=1), max_message_bytes=10)
    assert not bare.has_timestamp
    assert bare.execution_ms(10**18) == 0
    timed = validate_new(
        pb.EventRequest(id=1, deployment_id=1, timestamp=pb.Timestamp(send=1_000_000)),
        max_message_bytes=10,
    )
    assert timed.execution_ms(5_000_000) == 4


@pytest.mark.parametrize(
    ("message", "send", "receive", "deployment"),
    [
        ("", 0, 0, 1),
        ("hello", 0, 1_764_370_000_000_000_000, 7),
        ("é" * 300 + "\u0000\U0001f600", 1, 2**62, 2**31 - 1),
        ("x" * 70_000, -5, 123, 42),  # negative send: int64 two's complement
        ("m", 2**63 - 1, 0, 3),
    ],
)
def test_hand_encoded_payload_matches_the_protobuf_runtime(
    message: str, send: int, receive: int, deployment: int
) -> None:
    new = validate_new(
        pb.EventRequest(
            id=5, deployment_id=deployment, message=message, timestamp=pb.Timestamp(send=send)
        ),
        max_message_bytes=1 << 20,
    )
    expected = pb.EventRequest(
        message=message,
        timestamp=pb.Timestamp(send=send, receive=receive),
        deployment_id=deployment,
    ).SerializeToString()
    assert new.payload_without_id(receive) == expected


@pytest.mark.parametrize("text", ["1-", "-1", "a-1", "1-b", "1", "", "1--2"])
def test_entry_ids_are_checked(text: str) -> None:
    with pytest.raises(ValueError, match="not a stream entry id"):
        Cursor.from_entry(1, text)
