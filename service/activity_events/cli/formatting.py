"""Pure functions that turn protobuf messages into the client's output lines.

Two families live here:

* the legacy ones, which reproduce byte for byte what the original Go client
  printed: protobuf's "compact text" (``proto.CompactTextString`` of
  golang/protobuf 1.3, the ``String()`` of every generated Go message) inside a
  logrus terminal line ``INFO[0000] message``;
* the new ones: one JSON object per line for scripts, aligned tables and
  summaries for people.

Nothing here does I/O, so every format is unit-tested directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

#: logrus' TextFormatter pads the message to this width (``%-44s``) and adds a
#: space after it, so short messages line up with fields that may follow.
LOGRUS_MESSAGE_WIDTH = 44

#: logrus' four-letter level names, as its terminal format prints them.
LOGRUS_LEVELS = {"info": "INFO", "warning": "WARN", "error": "ERRO", "fatal": "FATA"}

#: ANSI colours logrus uses for each level on a terminal.
LOGRUS_COLOURS = {"info": 36, "warning": 33, "error": 31, "fatal": 31}


def go_quote(text: str) -> str:
    """Quote a string the way golang/protobuf's text marshaller did.

    It walks the UTF-8 *bytes*: ``\\n \\r \\t \\" \\\\`` get backslash escapes,
    printable ASCII stays, every other byte (non-ASCII included) becomes a
    three-digit octal escape.
    """
    escapes = {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x22: '\\"', 0x5C: "\\\\"}
    out = ['"']
    for byte in text.encode("utf-8"):
        if byte in escapes:
            out.append(escapes[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    out.append('"')
    return "".join(out)


def _go_scalar(field: FieldDescriptor, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return f"<{go_text(value)}>"
    if field.type == FieldDescriptor.TYPE_STRING:
        return go_quote(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return go_quote(value.decode("latin-1"))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    if field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else str(value)
    return str(value)


def go_text(message: Message) -> str:
    """Render ``message`` as Go's ``String()`` did (compact text format).

    Set fields in field-number order, each as ``name:value`` followed by a
    space (the compact form turns the multi-line format's newlines into
    spaces, hence also the trailing space); nested messages as
    ``name:<...>``; proto3 fields holding their zero value are left out.
    """
    parts: list[str] = []
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        parts.extend(f"{field.name}:{_go_scalar(field, item)} " for item in values)
    return "".join(parts)


def logrus_line(level: str, message: str, elapsed_seconds: float, colour: bool = False) -> str:
    """One line of logrus' terminal format: ``INFO[0004] message``.

    The bracket holds whole seconds since the program started, four digits.
    The message is padded to 44 characters and followed by a space, exactly as
    logrus' ``%-44s `` does (so lines carry trailing spaces, as the original's did).
    """
    name = LOGRUS_LEVELS.get(level, level.upper()[:4])
    if colour:
        name = f"\x1b[{LOGRUS_COLOURS.get(level, 37)}m{name}\x1b[0m"
    message = message.removesuffix("\n")
    return f"{name}[{int(elapsed_seconds):04d}] {message:<{LOGRUS_MESSAGE_WIDTH}} "


def event_line(event: Message, cursor: str = "") -> str:
    """The legacy ``Event: ...`` message; with a cursor (new modes) it is appended."""
    text = f"Event: {go_text(event)}"
    if cursor:
        text += f"cursor:{go_quote(cursor)}"
    return text


def created_line(event_id: int, deployment_id: int, execution_ms: int, duplicate: bool) -> str:
    """The legacy ``-add`` message, or its duplicate-aware sibling."""
    if duplicate:
        return (
            f"An event with id [{event_id}] for deployment_id [{deployment_id}] was already stored"
        )
    return (
        f"An event created with id [{event_id}] for deployment_id [{deployment_id}] "
        f"in {execution_ms} ms"
    )


def message_dict(message: Message) -> dict[str, Any]:
    """Proto3 JSON of ``message`` as a dict, with the .proto field names.

    The original names (``deployment_id``) are what ``-add`` users already
    type, and proto3 JSON parsers accept them; int64 fields are strings, as
    proto3 JSON requires. Zero-valued fields are kept so scripts always see them.
    """
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def json_line(value: dict[str, Any]) -> str:
    """One compact JSON object on one line (JSON Lines), non-ASCII kept readable."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def event_json(event: Message, cursor: str) -> str:
    """A stored event as one JSON line: the event's proto3 JSON plus ``cursor``."""
    data = message_dict(event)
    data["cursor"] = cursor
    return json_line(data)


def format_time_ns(ns: int, tz: Any = None) -> str:
    """Unix nanoseconds as local ``YYYY-MM-DD HH:MM:SS.mmm``; ``-`` for 0 (unknown)."""
    if ns <= 0:
        return "-"
    moment = datetime.fromtimestamp(ns / 1e9, tz=tz)
    if tz is None:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def shorten(text: str, width: int) -> str:
    """First line of ``text`` cut to ``width`` characters, with an ellipsis when cut."""
    first = text.splitlines()[0] if text else ""
    cut = len(first) > width or "\n" in text
    if len(first) > width:
        first = first[: max(width - 1, 0)]
    return first + "…" if cut else first


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """An aligned plain-text table: columns padded to their widest cell.

    ``right[i]`` right-aligns column ``i`` (numbers). The last column is not
    padded, so lines carry no trailing spaces.
    """
    widths = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = []
        for index, cell in enumerate(row):
            last = index == len(row) - 1
            if right[index]:
                cells.append(cell.rjust(widths[index]))
            else:
                cells.append(cell if last else cell.ljust(widths[index]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def line_list(numbers: Sequence[int], most: int = 20) -> str:
    """``3, 7, 9`` — or the first ``most`` and ``and N more``."""
    shown = ", ".join(str(number) for number in numbers[:most])
    if len(numbers) > most:
        shown += f" and {len(numbers) - most} more"
    return shown
