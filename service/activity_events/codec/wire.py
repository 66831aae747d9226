"""Hand-assembled protobuf bytes for the hot streaming responses.

Stream entries hold the canonical EventRequest bytes, so a page of history can
be sent by concatenating length-delimited fields instead of decoding and
re-encoding every event. The layouts below are those of the .proto:

    StoredEvent         { EventRequest event = 1; string cursor = 2; }
    WatchEventsResponse { repeated StoredEvent events = 1; bool caught_up = 2; }

tests/test_wire.py checks them against the protobuf runtime.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence

from activity_events.domain.errors import Corrupt
from activity_events.domain.events import StoredEvent, varint
from activity_events.redis.keys import EVENT_FIELD

_TAG_1_LEN = b"\x0a"  # field 1, wire type 2 (length-delimited)
_TAG_2_LEN = b"\x12"  # field 2, wire type 2
CAUGHT_UP = b"\x10\x01"  # WatchEventsResponse{caught_up: true}

__all__ = ["varint"]  # re-exported: the one varint encoder lives in events


def stored_event(event: StoredEvent) -> bytes:
    cursor = str(event.cursor).encode()
    return b"".join(
        (
            _TAG_1_LEN,
            varint(len(event.payload)),
            event.payload,
            _TAG_2_LEN,
            varint(len(cursor)),
            cursor,
        )
    )


def watch_response(events: Iterable[StoredEvent]) -> bytes:
    return b"".join(field_1(stored_event(event)) for event in events)


def field_1(body: bytes) -> bytes:
    """``body`` as a length-delimited field 1 (an element of a repeated message field)."""
    return _TAG_1_LEN + varint(len(body)) + body


def chunked(pieces: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    """Concatenations of ``pieces`` (serialized repeated-field elements), in order,
    each at most about ``max_bytes`` (a single larger piece goes out alone), so
    that no message exceeds a client's receive limit (4 MiB by default in gRPC)."""
    parts: list[bytes] = []
    size = 0
    for piece in pieces:
        if parts and size + len(piece) > max_bytes:
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(piece)
        size += len(piece)
    if parts:
        yield b"".join(parts)


def watch_responses(events: Sequence[StoredEvent], max_bytes: int) -> Iterator[bytes]:
    """WatchEventsResponse messages holding ``events`` in order (see :func:`chunked`)."""
    return chunked((field_1(stored_event(event)) for event in events), max_bytes)


def watch_responses_rows(
    prefix: bytes, rows: Sequence[tuple[bytes, Sequence[bytes]]], max_bytes: int
) -> Iterator[bytes]:
    """:func:`watch_responses` straight from unparsed stream entries of one
    deployment (``[entry id, [field, value, ...]]``; ``prefix`` =
    ``b"<deployment>:"``). The replay hot path: one join per event, no objects."""
    parts: list[bytes] = []
    size = 0
    for entry, fields in rows:
        payload = fields[1] if fields[0] == EVENT_FIELD else payload_of(prefix, entry, fields)
        payload_len = len(payload)
        cursor_len = len(prefix) + len(entry)
        head = varint(payload_len)
        tail = varint(cursor_len)
        body_len = 2 + len(head) + payload_len + len(tail) + cursor_len
        piece = b"".join(
            (
                _TAG_1_LEN,
                varint(body_len),
                _TAG_1_LEN,
                head,
                payload,
                _TAG_2_LEN,
                tail,
                prefix,
                entry,
            )
        )
        if parts and size + len(piece) > max_bytes:
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(piece)
        size += len(piece)
    if parts:
        yield b"".join(parts)


def payload_of(prefix: bytes, entry: bytes, fields: Sequence[bytes]) -> bytes:
    """The event bytes among an entry's [field, value, ...] (usually the first pair)."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == EVENT_FIELD:
            return fields[i + 1]
    where = prefix.decode() + entry.decode(errors="replace")
    raise Corrupt(f"stream entry {where} has no event field")


def event_result(
    index: int,
    event_id: int,
    deployment_id: int,
    outcome: int,
    *,
    cursor: str = "",
    reason: str = "",
    receive: int = 0,
) -> bytes:
    """One CreateEventsResponse.results element (EventResult, as field 1):

        EventResult { int32 index = 1; int32 id = 2; int32 deployment_id = 3;
                      Outcome outcome = 4; string cursor = 5; string reason = 6;
                      int64 receive = 7; }

    Hand-encoded because a bulk call builds one per event; proto3 omits zero
    values. tests/test_wire.py checks it against the protobuf runtime."""
    text = reason.encode()
    return event_result_from_parts(
        index,
        event_id,
        deployment_and_outcome(deployment_id, outcome),
        cursor.encode(),
        (b"\x32" + varint(len(text)) + text if text else b"") + receive_field(receive),
    )


@functools.lru_cache(maxsize=1024)
def deployment_and_outcome(deployment_id: int, outcome: int) -> bytes:
    """EventResult fields 3 and 4, the same for most events of a batch."""
    return (b"\x18" + varint(deployment_id) if deployment_id else b"") + (
        b"\x20" + varint(outcome) if outcome else b""
    )


def receive_field(receive: int) -> bytes:
    """EventResult field 7, the same for every event of a batch."""
    return b"\x38" + varint(receive) if receive else b""


def event_result_from_parts(
    index: int, event_id: int, middle: bytes, cursor: bytes, tail: bytes
) -> bytes:
    """:func:`event_result` from pre-encoded parts: ``middle`` from
    :func:`deployment_and_outcome`, ``cursor`` the cursor's text, ``tail``
    fields 6 and 7 (for a created or duplicate event just :func:`receive_field`,
    shared by the batch). The bulk path calls it once per event."""
    return field_1(
        b"".join(
            (
                b"\x08" + varint(index) if index else b"",
                b"\x10" + varint(event_id) if event_id else b"",
                middle,
                b"\x2a" + varint(len(cursor)) + cursor if cursor else b"",
                tail,
            )
        )
    )


def identity(message: bytes) -> bytes:
    """Serializer for handlers that yield bytes already in wire form."""
    return message
