"""The domain model: events, their validation, and cursors.

An event is stored as the protobuf bytes of the legacy ``EventRequest`` (with
``timestamp.receive`` set), so that history can be served without decoding and
re-encoding each event. The id field is written by the append script, because
the script is what assigns ids for ``id == 0``; every other field is encoded
here, once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import total_ordering

from activity_events.domain.errors import InvalidArgument
from activity_events.domain.limits import INT32_MAX
from activity_events.pb import activityevents_pb2 as pb

DIGEST_BYTES = 6
"""Length of a message digest in the dedup index (append.lua relies on it)."""

_CURSOR = re.compile(r"^(?:(\d{1,10}):)?(\d{1,20})-(\d{1,20})$")


def _varint_slow(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint_slow(n) for n in range(1 << 14)]
"""Varints of every value below 2**14 (lengths, most ids)."""

_PAIRS = [bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80)) for n in range(1 << 14)]
"""Two continued varint bytes for each 14-bit group: a nanosecond timestamp (nine
bytes) takes four lookups and one final byte instead of nine loop turns."""


def varint(n: int) -> bytes:
    """Protobuf varint of a non-negative int64, or of a negative one as its
    64-bit two's complement (how int64 fields encode negative values).
    Runs for several fields of every ingested event, hence the tables."""
    if n < 0:
        n += 1 << 64
    if n < 16384:
        return _SMALL[n]
    parts = []
    while n >= 16384:
        parts.append(_PAIRS[n & 0x3FFF])
        n >>= 14
    parts.append(_SMALL[n])
    return b"".join(parts)


# The stored event is the canonical EventRequest encoding (fields in number
# order); these are its fields' keys (field number << 3 | wire type). The append
# script (redis/scripts/append.lua) prepends the key of ``id`` (0x08) itself.
EVENT_MESSAGE = b"\x12"
"""EventRequest.message: field 2, length-delimited."""
EVENT_TIMESTAMP = b"\x1a"
"""EventRequest.timestamp: field 3, length-delimited."""
EVENT_DEPLOYMENT = b"\x20"
"""EventRequest.deployment_id: field 4, varint."""
TIMESTAMP_SEND = b"\x08"
"""Timestamp.send: field 1, varint."""
TIMESTAMP_RECEIVE = b"\x10"
"""Timestamp.receive: field 2, varint."""


def receive_timestamp_field(receive_ns: int) -> bytes:
    """Timestamp.receive (field 2) as encoded inside the stored payload."""
    return TIMESTAMP_RECEIVE + varint(receive_ns) if receive_ns else b""


@total_ordering
@dataclass(frozen=True, slots=True)
class Cursor:
    """Position of one stored event: its deployment and its Redis stream entry id.

    Text form ``"<deployment>:<ms>-<seq>"``. Cursors order by entry id, then by
    deployment; that is the order of "all deployments" listings.
    """

    deployment_id: int
    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.deployment_id}:{self.ms}-{self.seq}"

    @property
    def entry_id(self) -> str:
        return f"{self.ms}-{self.seq}"

    def key(self) -> tuple[int, int, int]:
        return (self.ms, self.seq, self.deployment_id)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Cursor):
            return NotImplemented
        return self.key() < other.key()

    @classmethod
    def from_entry(cls, deployment_id: int, entry_id: bytes | str) -> Cursor:
        """The cursor of a stream entry id as Redis returns it ("<ms>-<seq>")."""
        raw = entry_id.encode() if isinstance(entry_id, str) else entry_id
        ms, dash, seq = raw.partition(b"-")
        if not (dash and ms.isdigit() and seq.isdigit()):
            raise ValueError(f"not a stream entry id: {raw!r}")
        return cls(deployment_id, int(ms), int(seq))

    @classmethod
    def parse(cls, text: str, *, deployment_id: int, field: str = "after") -> Cursor:
        """Parse a client-supplied cursor for a watch of ``deployment_id`` (0 = all).

        For one deployment the bare entry-id form ``"<ms>-<seq>"`` is accepted too.
        """
        match = _CURSOR.match(text.strip())
        if match is None:
            raise InvalidArgument(
                field, f"malformed cursor {text[:64]!r}; expected '<deployment>:<ms>-<seq>'"
            )
        owner_text, ms_text, seq_text = match.groups()
        ms, seq = int(ms_text), int(seq_text)
        if ms >= 2**64 or seq >= 2**64:
            raise InvalidArgument(field, f"cursor {text[:64]!r} is out of range")
        if owner_text is None:
            if deployment_id == 0:
                raise InvalidArgument(
                    field,
                    "a watch of all deployments needs a full cursor '<deployment>:<ms>-<seq>'",
                )
            return cls(deployment_id, ms, seq)
        owner = int(owner_text)
        if owner <= 0 or owner > INT32_MAX:
            raise InvalidArgument(field, f"cursor names an invalid deployment {owner}")
        if deployment_id not in (0, owner):
            raise InvalidArgument(
                field, f"cursor belongs to deployment {owner}, not deployment {deployment_id}"
            )
        return cls(owner, ms, seq)


@dataclass(slots=True)
class NewEvent:
    """A validated event to store. ``event_id == 0`` asks for the next free id.

    Treated as immutable; not frozen because a frozen dataclass is several times
    slower to build, and bulk ingestion builds one per event."""

    deployment_id: int
    event_id: int
    message: bytes
    """The message's UTF-8 bytes (encoded once: size check, digest and payload use them)."""
    send_ns: int
    has_timestamp: bool

    def digest(self) -> bytes:
        """Identity of the payload: two requests with the same (deployment, id) are
        the same event when their messages match. The send time is not part of
        it, so a client's retry with a fresh send time is still a duplicate.
        Six bytes: a different message passes for the same one with odds of
        2**-48, and the dedup index stays small (it holds one per event)."""
        return hashlib.blake2b(self.message, digest_size=DIGEST_BYTES).digest()

    def payload_without_id(self, receive_ns: int, receive_field: bytes | None = None) -> bytes:
        """EventRequest bytes of every field but ``id`` (field 1), which the append
        script prepends once the id is known, so the stored bytes are the
        canonical encoding (fields in number order). Encoded by hand: this runs
        once per ingested event, and building a message object costs more than
        the rest of the event's work. tests/test_events.py checks it against the
        protobuf runtime."""
        message = self.message
        if receive_field is None:  # callers encoding a batch pass it, computed once
            receive_field = receive_timestamp_field(receive_ns)
        send = TIMESTAMP_SEND + varint(self.send_ns) if self.send_ns else b""
        timestamp = send + receive_field
        return b"".join(
            (
                EVENT_MESSAGE + varint(len(message)) + message if message else b"",
                EVENT_TIMESTAMP + varint(len(timestamp)) + timestamp,
                EVENT_DEPLOYMENT + varint(self.deployment_id),
            )
        )

    def execution_ms(self, receive_ns: int) -> int:
        """(receive - send) in ms, as the original service reported; 0 without a timestamp."""
        if not self.has_timestamp or self.send_ns == 0:
            return 0
        return (receive_ns - self.send_ns) // 1_000_000


def validate_deployment_id(value: int, *, field: str = "deployment_id", allow_all: bool) -> int:
    if value < 0 or (value == 0 and not allow_all):
        need = ">= 0 (0 means all deployments)" if allow_all else "> 0"
        raise InvalidArgument(field, f"must be {need}, got {value}")
    return value


def validate_new(request: pb.EventRequest, *, max_message_bytes: int) -> NewEvent:
    """Check an incoming EventRequest; raise InvalidArgument naming the bad field."""
    validate_deployment_id(request.deployment_id, allow_all=False)
    if request.id < 0:
        raise InvalidArgument("id", f"must be >= 0 (0 asks the server for one), got {request.id}")
    message = request.message.encode()
    size = len(message)
    if size > max_message_bytes:
        raise InvalidArgument(
            "message", f"is {size} bytes long; the limit is {max_message_bytes} bytes"
        )
    has_timestamp = request.HasField("timestamp")
    return NewEvent(
        deployment_id=request.deployment_id,
        event_id=request.id,
        message=message,
        send_ns=request.timestamp.send if has_timestamp else 0,
        has_timestamp=has_timestamp,
    )


@dataclass(slots=True)
class StoredEvent:
    """One event as read back: its cursor and its EventRequest bytes (treat as
    immutable; not frozen so that live events can extend it with a cache)."""

    cursor: Cursor
    payload: bytes

    def decode(self) -> pb.EventRequest:
        return pb.EventRequest.FromString(self.payload)

    def to_proto(self) -> pb.StoredEvent:
        return pb.StoredEvent(event=self.decode(), cursor=str(self.cursor))
