"""Hand-assembled protobuf bytes for the hot paths.

Stream entries hold the canonical EventRequest bytes, so a page of history
can be sent by concatenating length-delimited fields instead of decoding and
re-encoding every event, and a subscription delivery likewise. The layouts
are those of the .proto:

    StoredEvent         { EventRequest event = 1; string cursor = 2; }
    WatchEventsResponse { repeated StoredEvent events = 1; bool caught_up = 2; }
    Delivery            { EventRequest event = 1; string cursor = 2;
                          int32 delivery_count = 3; }
    SubscribeResponse   { repeated Delivery deliveries = 1; ... }

Where hand encoding does not pay (single messages, listings, CreateEvents'
results: about 0.1 µs an event) the protobuf runtime is used.
tests/test_wire.py checks every function here against the protobuf runtime,
at every varint width.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from activity_events.domain.events import StoredEvent, varint

VARINT = 0
LEN = 2


def tag(field: int, wire_type: int) -> bytes:
    """The key of a field: its number and wire type (one byte for fields 1-15)."""
    return varint(field << 3 | wire_type)


FIELD_1 = tag(1, LEN)
"""Field 1, length-delimited: ``StoredEvent.event``, ``WatchEventsResponse.events``,
``CreateEventsResponse.results``, ``Delivery.event``, ``SubscribeResponse.deliveries``."""
FIELD_2 = tag(2, LEN)
"""Field 2, length-delimited: ``StoredEvent.cursor``, ``Delivery.cursor``."""
DELIVERY_COUNT = tag(3, VARINT)

CAUGHT_UP = tag(2, VARINT) + varint(1)
"""WatchEventsResponse{caught_up: true}: the end of a follow stream's history."""

Row = tuple[bytes, bytes]
"""A stored event as the history hot path reads it: (entry id, EventRequest bytes)."""


def stored_event(event: StoredEvent) -> bytes:
    cursor = str(event.cursor).encode()
    return b"".join(
        (FIELD_1, varint(len(event.payload)), event.payload, FIELD_2, varint(len(cursor)), cursor)
    )


def field_1(body: bytes) -> bytes:
    """``body`` as a length-delimited field 1 (an element of a repeated message field)."""
    return FIELD_1 + varint(len(body)) + body


def chunked(pieces: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    """Concatenations of ``pieces`` (serialized repeated-field elements), in order,
    each at most about ``max_bytes`` (a single larger piece goes out alone), so
    that no message exceeds a client's receive limit (4 MiB by default in gRPC)."""
    return (message for message, _ in chunk_ends(pieces, max_bytes))


def chunk_ends(pieces: Iterable[bytes], max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """:func:`chunked`, each message with the number of pieces sent once it is
    (so a stream knows the last event of each message it sends)."""
    parts: list[bytes] = []
    size = 0
    count = 0
    for piece in pieces:
        if parts and size + len(piece) > max_bytes:
            yield b"".join(parts), count
            parts, size = [], 0
        parts.append(piece)
        size += len(piece)
        count += 1
    if parts:
        yield b"".join(parts), count


def watch_piece(event: StoredEvent) -> bytes:
    """One event as an element of ``WatchEventsResponse.events``; live followers
    share it (``LiveEvent.encoded(watch_piece)``)."""
    return field_1(stored_event(event))


def watch_responses(events: Sequence[StoredEvent], max_bytes: int) -> Iterator[bytes]:
    """WatchEventsResponse messages holding ``events`` in order (see :func:`chunked`)."""
    return chunked((watch_piece(event) for event in events), max_bytes)


def watch_responses_rows(
    prefix: bytes, rows: Sequence[Row], max_bytes: int
) -> Iterator[tuple[bytes, int]]:
    """:func:`watch_responses` straight from rows of one deployment (``prefix`` =
    ``b"<deployment>:"``), each message with the number of rows sent once it is.
    The replay hot path: one join per event, no objects."""
    parts: list[bytes] = []
    size = 0
    for count, (entry, payload) in enumerate(rows):
        payload_len = len(payload)
        cursor_len = len(prefix) + len(entry)
        head = varint(payload_len)
        tail = varint(cursor_len)
        body_len = 2 + len(head) + payload_len + len(tail) + cursor_len
        piece = b"".join(
            (FIELD_1, varint(body_len), FIELD_1, head, payload, FIELD_2, tail, prefix, entry)
        )
        if parts and size + len(piece) > max_bytes:
            yield b"".join(parts), count
            parts, size = [], 0
        parts.append(piece)
        size += len(piece)
    if parts:
        yield b"".join(parts), len(rows)


class DeliveryParts(Protocol):
    """What a subscription delivery is made of (``redis.groups.Delivered``)."""

    @property
    def payload(self) -> bytes: ...

    @property
    def cursor(self) -> bytes: ...

    @property
    def count(self) -> int: ...


def delivery_bytes(item: DeliveryParts) -> bytes:
    """One ``SubscribeResponse.deliveries`` element, assembled from the stored
    EventRequest bytes without decoding them."""
    payload = item.payload
    cursor = item.cursor
    body = b"".join(
        (
            FIELD_1,
            varint(len(payload)),
            payload,
            FIELD_2,
            varint(len(cursor)),
            cursor,
            DELIVERY_COUNT,
            varint(item.count),
        )
    )
    return field_1(body)


def delivery_responses(items: Sequence[DeliveryParts], max_bytes: int) -> Iterator[bytes]:
    """SubscribeResponse messages carrying ``items`` in order, each about ``max_bytes`` at most."""
    return chunked((delivery_bytes(item) for item in items), max_bytes)
