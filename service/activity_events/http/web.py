"""Just enough HTTP/1.1 for the activity page: parse a request head, write a response.

The HTTP side port answers each request on its own connection and closes it
(``Connection: close``), so there is no keep-alive, no chunking and no
request body to handle: a request is its head. Server-Sent Events are a
response without ``Content-Length`` whose body ends when the connection does.

Every response carries headers that keep the page's data where it belongs:
a Content-Security-Policy that allows only the page's own scripts and styles
(so even a message that slipped past escaping could not run), no referrer
(an EventSource URL may carry a token), no caching of API answers, no framing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class BadRequest(ValueError):
    """The request head cannot be understood."""


@dataclass(frozen=True)
class Request:
    """One parsed request head."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str) -> str | None:
        """The first value of query parameter ``name``, if present."""
        values = self.query.get(name)
        return values[0] if values else None

    @property
    def head_only(self) -> bool:
        return self.method == "HEAD"


def parse_head(head: bytes) -> Request:
    """A :class:`Request` from the bytes up to and including the blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest("malformed request line")
    method, target, _version = parts
    url = urlsplit(target)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name:
            headers[name.strip().lower()] = value.strip()
    return Request(
        method=method,
        path=unquote(url.path) or "/",
        query=parse_qs(url.query, keep_blank_values=True),
        headers=headers,
    )


def response_head(
    status: HTTPStatus,
    content_type: str,
    length: int | None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Status line and headers; ``length`` None for a body that ends with the connection."""
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    headers = {**SECURITY_HEADERS, **(extra or {})}
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send(  # noqa: PLR0917 - the parts of a response, in the order they go out
    writer: asyncio.StreamWriter,
    request: Request | None,
    status: HTTPStatus,
    content_type: str,
    body: bytes,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Write a whole response (the body left out for HEAD) and flush it."""
    head_only = request is not None and request.head_only
    writer.write(response_head(status, content_type, len(body), extra))
    if not head_only:
        writer.write(body)
    await writer.drain()


async def send_json(
    writer: asyncio.StreamWriter,
    request: Request | None,
    value: Any,
    status: HTTPStatus = HTTPStatus.OK,
    extra: Mapping[str, str] | None = None,
) -> None:
    """A JSON answer that is never cached (it holds live data, maybe behind a token)."""
    body = json.dumps(value, separators=(",", ":")).encode()
    headers = {"Cache-Control": "no-store", **(extra or {})}
    await send(writer, request, status, "application/json", body, headers)


async def send_error(
    writer: asyncio.StreamWriter,
    request: Request | None,
    status: HTTPStatus,
    message: str,
    extra: Mapping[str, str] | None = None,
) -> None:
    await send_json(writer, request, {"error": message}, status, extra)


def sse_frame(data: Any, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One Server-Sent Events message; ``data`` as one line of JSON (JSON escapes newlines)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def sse_retry(milliseconds: int) -> bytes:
    """Tells EventSource how long to wait before reconnecting."""
    return f"retry: {milliseconds}\n\n".encode()


SSE_KEEPALIVE = b": keep-alive\n\n"
"""A comment line: keeps proxies from closing an idle stream, finds dead clients."""
