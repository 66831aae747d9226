"""Events typed by people or read from files: JSON in, ``EventRequest`` out.

The original client fed ``-add`` through Go's ``encoding/json``, which matches
keys case-insensitively; proto3 JSON adds the lowerCamelCase spelling
(``deploymentId``). Both are accepted. Unlike the original, an unknown key is
an error rather than silently dropped: a typo such as ``"deploymnet_id"``
would otherwise store an event without its deployment.
"""

from __future__ import annotations

import json
import time
from typing import Any

from google.protobuf import json_format

from activity_events.pb import activityevents_pb2 as pb

#: Lower-cased accepted key -> the .proto field name.
FIELD_KEYS = {
    "id": "id",
    "message": "message",
    "timestamp": "timestamp",
    "deployment_id": "deployment_id",
    "deploymentid": "deployment_id",
}

#: Keys that export writes besides the event's own fields; import skips them.
EXPORT_ONLY_KEYS = frozenset({"cursor"})


class EventInputError(ValueError):
    """The input is not a valid event; the message says why, on one line."""


def event_from_dict(data: Any, ignore: frozenset[str] = frozenset()) -> pb.EventRequest:
    """Build an EventRequest from decoded JSON, checking keys and value types."""
    if not isinstance(data, dict):
        raise EventInputError(
            'expected a JSON object such as {"id": 1, "deployment_id": 1, "message": "..."}'
        )
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key in ignore:
            continue
        name = FIELD_KEYS.get(str(key).lower())
        if name is None:
            known = ", ".join(sorted(set(FIELD_KEYS.values())))
            raise EventInputError(f"unknown field {key!r} (known fields: {known})")
        if name in fields:
            raise EventInputError(f"field {name!r} is given twice")
        fields[name] = value
    event = pb.EventRequest()
    try:
        json_format.ParseDict(fields, event)
    except json_format.ParseError as error:
        raise EventInputError(_short_parse_error(str(error))) from None
    return event


def _short_parse_error(text: str) -> str:
    # protobuf appends the whole field list to unknown-field errors; the
    # first sentence is the useful part.
    return " ".join(text.split()).split(". Available Fields")[0]


def event_from_json(text: str, ignore: frozenset[str] = frozenset()) -> pb.EventRequest:
    """Parse one JSON document (an ``-add`` argument or a file line) into an event."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise EventInputError(f"malformed JSON: {error}") from None
    return event_from_dict(data, ignore)


def stamp_send_time(event: pb.EventRequest, now_ns: int | None = None) -> None:
    """Set ``timestamp.send`` to now, as the original client did, unless the input gave one."""
    if event.timestamp.send == 0:
        event.timestamp.send = time.time_ns() if now_ns is None else now_ns
