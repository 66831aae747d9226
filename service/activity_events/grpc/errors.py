"""Domain errors to gRPC status codes, in one table, and the request parser.

The call pipeline is the only place that turns an exception into a status;
every service raises :mod:`activity_events.domain.errors` and nothing else.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError

from activity_events.domain.errors import (
    ActivityError,
    Conflict,
    Corrupt,
    DeadlineExceeded,
    Exhausted,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    StoreUnavailable,
    Unauthenticated,
)

STATUS: dict[type[ActivityError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    Corrupt: grpc.StatusCode.DATA_LOSS,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""Domain error -> gRPC status. Subclasses map through their nearest listed base
(Overloaded, FollowerLagged and Stalled are Exhausted; ShuttingDown and
NotReplicated are StoreUnavailable)."""

_RESOLVED: dict[type[ActivityError], grpc.StatusCode] = {}


def status_for(error: ActivityError) -> grpc.StatusCode:
    """The status of a domain error (INTERNAL for a class outside the table)."""
    kind = type(error)
    code = _RESOLVED.get(kind)
    if code is None:
        code = next((STATUS[c] for c in kind.__mro__ if c in STATUS), grpc.StatusCode.INTERNAL)
        _RESOLVED[kind] = code
    return code


def parse(message_type: Any, data: bytes) -> Any:
    """``data`` as a ``message_type``; InvalidArgument naming the request type when
    the bytes do not parse (grpc would answer UNKNOWN for a failing deserializer)."""
    try:
        return message_type.FromString(data)
    except DecodeError as error:
        problem = str(error).split(":")[-1].strip()[:120] or "undecodable"
        raise InvalidArgument(
            "request", f"is not a valid {message_type.DESCRIPTOR.full_name}: {problem}"
        ) from None
