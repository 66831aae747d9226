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
import json
import logging
import time
from typing import Any

from google.protobuf.message import Message
from opentelemetry import trace

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


class AccessLog:
    """The access lines of one method: what is the same on every line is made once.

    :meth:`write` hands the line to the process's JSON handler directly when
    nothing else listens (see :func:`~activity_events.observability.logs.direct_handler`),
    as a string built from pieces made here once, which costs a fraction of
    formatting a log record (a line per call was a fifth of a create's CPU).
    Otherwise, with handlers of their own on the access logger (tests, custom
    set-ups), it logs a record with the same fields.
    """

    __slots__ = ("_fixed", "_head", "full_method", "kind", "level", "method", "service")

    def __init__(self, service: str, method: str, kind: str, *, quiet: bool) -> None:
        self.service = service
        self.method = method
        self.full_method = f"/{service}/{method}"
        self.kind = kind
        self.level = logging.DEBUG if quiet else logging.INFO
        # Names of services and methods are identifiers: JSON-safe as they are.
        self._head = (
            f', "level": "{logging.getLevelName(self.level)}", "logger": "{logger.name}"'
            f', "message": "{self.full_method} '
        )
        self._fixed = (
            f', "grpc_service": "{service}", "grpc_method": "{method}"'
            f', "grpc_type": "{kind}", "grpc_code": "'
        )

    def write(  # noqa: PLR0917 - the fields of one line, in the order they are shown
        self,
        code: str,
        seconds: float,
        peer: str,
        received: int,
        sent: int,
        deployments: list[int] | None,
        error: BaseException | None = None,
        span: trace.Span | None = None,
    ) -> None:
        """Write one access line (the caller checked ``logger.isEnabledFor(level)``).

        ``span`` is the call's span, whose ids the line carries (the current
        span's when it is None and a record is logged)."""
        handler = logs.direct_handler(logger)
        if handler is None or self.level < handler.level:
            self._log(code, seconds, peer, received, sent, deployments, error)
            return
        tail = ""
        if deployments:
            if len(deployments) == 1:
                tail = f', "deployment_id": {deployments[0]:d}'
            else:
                tail = f', "deployment_ids": [{", ".join(str(int(d)) for d in deployments)}]'
        if error is not None:
            tail += f', "error": {json.dumps(logs.redact(f"{type(error).__name__}: {error}"))}'
        ids = "" if span is None else logs.span_fields(span.get_span_context())
        handler.write_line(
            f'{{"time": "{logs.rfc3339(time.time())}"{self._head}{code} {seconds * 1000:.1f} ms"'
            f'{ids}{self._fixed}{code}", "duration_seconds": {seconds:.6f}, '
            f'"peer": {_text(peer)}, "msg_received": {received:d}, "msg_sent": {sent:d}{tail}}}'
        )

    def _log(  # noqa: PLR0917 - as write
        self,
        code: str,
        seconds: float,
        peer: str,
        received: int,
        sent: int,
        deployments: list[int] | None,
        error: BaseException | None,
    ) -> None:
        fields: dict[str, Any] = {
            "grpc_service": self.service,
            "grpc_method": self.method,
            "grpc_type": self.kind,
            "grpc_code": code,
            "duration_seconds": round(seconds, 6),
            "peer": peer,
            "msg_received": received,
            "msg_sent": sent,
        }
        if deployments:
            key = "deployment_id" if len(deployments) == 1 else "deployment_ids"
            fields[key] = deployments[0] if len(deployments) == 1 else deployments
        if error is not None:
            fields["error"] = logs.redact(f"{type(error).__name__}: {error}")
        message = f"{self.full_method} {code} {seconds * 1000:.1f} ms"
        logger.log(self.level, "%s", message, extra=fields)


_texts: dict[str, str] = {}
"""Peers as JSON strings: a connection's calls all name the same peer."""

MAX_TEXTS = 4096


def _text(value: str) -> str:
    """A JSON string (remembered for the peers seen lately)."""
    text = _texts.get(value)
    if text is None:
        if len(_texts) >= MAX_TEXTS:
            _texts.clear()
        text = _texts[value] = json.dumps(value, ensure_ascii=False)
    return text
