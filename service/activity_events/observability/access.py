"""The access log: one line per RPC on logger ``activity_events.access``.

Written by the call pipeline when a call ends (inside the call's span, so the
line carries its trace id), with these extra fields: ``grpc_service``,
``grpc_method``, ``grpc_type``, ``grpc_code`` (Go spelling), ``duration_seconds``,
``peer``, ``deployment_id`` (or ``deployment_ids`` for a batch naming
several), ``msg_received``, ``msg_sent``, and ``error`` for an unexpected
exception. Health and reflection calls log at DEBUG so probes do not drown
the log. Access lines go to their own logger so operators can route or
silence them (``logging.getLogger("activity_events.access")``).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from google.protobuf.message import Message

from activity_events.observability import logs

logger = logging.getLogger("activity_events.access")

MAX_LOGGED_DEPLOYMENTS = 10
MAX_SCANNED_EVENTS = 64
"""A few leading events tell whom a batch is about; walking all of a 1,000-event
batch would cost more than logging is worth."""


def deployment_ids(message: Any) -> list[int]:
    """Deployment ids a request names: its ``deployment_id``, a ``Deployment``'s ``id``,
    or those of the events in a batch (first few, without repeats)."""
    if not isinstance(message, Message):
        return []
    fields = message.DESCRIPTOR.fields_by_name
    if "deployment_id" in fields:
        return [int(message.deployment_id)]  # type: ignore[attr-defined]
    if message.DESCRIPTOR.name == "Deployment" and "id" in fields:
        return [int(message.id)]  # type: ignore[attr-defined]
    if "events" in fields and fields["events"].message_type is not None:
        seen: list[int] = []
        for event in itertools.islice(message.events, MAX_SCANNED_EVENTS):  # type: ignore[attr-defined]
            for found in deployment_ids(event):
                if found not in seen:
                    seen.append(found)
            if len(seen) >= MAX_LOGGED_DEPLOYMENTS:
                break
        return seen
    return []


def write(  # noqa: PLR0917 - the fields of one line, in the order they are shown
    level: int,
    full_method: str,
    service: str,
    method: str,
    kind: str,
    code: str,
    seconds: float,
    peer: str,
    received: int,
    sent: int,
    deployments: list[int] | None,
    error: BaseException | None = None,
) -> None:
    """Write one access line (the caller checked ``logger.isEnabledFor(level)``)."""
    fields: dict[str, Any] = {
        "grpc_service": service,
        "grpc_method": method,
        "grpc_type": kind,
        "grpc_code": code,
        "duration_seconds": round(seconds, 6),
        "peer": peer,
        "msg_received": received,
        "msg_sent": sent,
    }
    if deployments:
        if len(deployments) == 1:
            fields["deployment_id"] = deployments[0]
        else:
            fields["deployment_ids"] = deployments
    message = f"{full_method} {code} {seconds * 1000:.1f} ms"
    if error is not None:
        fields["error"] = logs.redact(f"{type(error).__name__}: {error}")
    handler = logs.direct_handler(logger)
    if handler is not None and level >= handler.level:
        # The common case, one line per call: skip the LogRecord machinery
        # (the line is what JsonFormatter would make of it).
        handler.write_line(
            logs.json_line(logging.getLevelName(level), logger.name, message, fields)
        )
    else:
        logger.log(level, "%s", message, extra=fields)
