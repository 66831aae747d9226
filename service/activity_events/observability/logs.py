"""JSON logs: one object per line on stdout, for every logger in the process.

Log shippers (Fluent Bit, Vector, Loki's promtail...) read container stdout
line by line; a single traceback spread over twenty plain-text lines breaks
that. So everything the process logs, its own loggers, third-party ones
(grpc, redis, asyncio), ``warnings`` and uncaught exceptions, goes through
one formatter that writes exactly one JSON object per line.

Every object has ``time`` (RFC 3339, UTC), ``level``, ``logger`` and
``message``; ``trace_id``/``span_id`` (lowercase hex, as trace backends show
them) when the record was made inside an OpenTelemetry span; ``exception``
with the traceback when there is one; and any ``extra={...}`` fields as
top-level keys. Secrets never reach the output: passwords in URLs, bearer
tokens, ``password=...`` pairs and any secret registered with
:func:`configure` are replaced by ``***`` before the line is written.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import re
import sys
import threading
import types
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from opentelemetry import trace

logger = logging.getLogger(__name__)

MASK = "***"
"""What a redacted secret is replaced with."""

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s/]*@")
"""user:password@ in a URL; the password runs to the last ``@`` before the path, so
one holding ``@`` is masked whole (multi-host Sentinel and Cluster URLs too)."""
_BEARER = re.compile(r"(?i)(?P<head>\b(?:bearer|basic)\s+)[A-Za-z0-9\-._~+/]+=*")
_KEY_VALUE = re.compile(
    r"(?i)(?P<head>\b(?:[a-z]+_)?(?:password|passwd|pwd|token|secret|api[_-]?key|authorization)"
    r"[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"'&,;}]+)"
)

_MAYBE_SECRET = re.compile(r"(?i)://|bearer|basic|passw|pwd|token|secret|api[_-]?key|authorization")
"""Every text the three patterns above could change matches this."""

_SECRET_WORDS = (
    "://", "bearer", "basic", "passw", "pwd", "token", "secret",
    "apikey", "api_key", "api-key", "authorization",
)  # fmt: skip
"""_MAYBE_SECRET's words: ``in`` on the lowercased text finds them ten times
faster than the case-insensitive pattern (it runs for every log line)."""


def _maybe_secret(text: str) -> bool:
    if not text.isascii():  # Unicode case folding: leave it to the pattern
        return _MAYBE_SECRET.search(text) is not None
    low = text.lower()
    return any(word in low for word in _SECRET_WORDS)


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class Redactor:
    """Replaces secrets in text: URL passwords, bearer tokens, key=value secrets, known values.

    Known values (e.g. the Redis password from the settings) are matched
    literally, so a secret is caught even where no pattern would see it,
    such as inside an error message from a library.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        known: set[str] = set()
        for secret in secrets:
            parts = None
            with contextlib.suppress(ValueError):
                parts = urlsplit(secret)
            if parts is not None and parts.scheme and parts.netloc:
                # A URL: only its password is secret; host and port stay readable.
                if parts.password:
                    known.update({parts.password, unquote(parts.password)})
            else:
                known.add(secret)
        self._secrets = sorted({s for s in known if len(s) >= 3}, key=len, reverse=True)

    def is_clean(self, text: str) -> bool:
        """True when redaction would leave ``text`` as it is. Several texts can be
        checked at once joined by NUL (no pattern or secret spans a NUL)."""
        return not _maybe_secret(text) and not any(s in text for s in self._secrets)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if not _maybe_secret(text):
            return text  # the common case (e.g. access-log fields): one scan, no substitutions
        text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + "@", text)
        text = _BEARER.sub(lambda m: m.group("head") + MASK, text)
        return _KEY_VALUE.sub(
            lambda m: m.group("head") + (m.group("value") if m.group("value") == MASK else MASK),
            text,
        )


_redactor = Redactor()


def redact(text: str) -> str:
    """``text`` with secrets masked; use it on error messages that leave the process.

    Knows the literal secrets registered with :func:`configure` as well as the patterns.
    """
    return _redactor(text)


_second: tuple[int, str] = (-1, "")


def rfc3339(created: float) -> str:
    """``created`` (Unix seconds) as RFC 3339 UTC with milliseconds; the date and
    time of day are formatted once per second (every log line needs this)."""
    global _second  # noqa: PLW0603 - a one-entry cache
    whole = int(created)
    cached_second, text = _second
    if whole != cached_second:
        text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, text)
    return f"{text}.{int((created - whole) * 1000):03d}Z"


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes formatted lines to a stream, in batches.

    A write to stdout (a pipe, under a container runtime) is a system call;
    one per line was a large share of a busy server's CPU. Lines are
    collected and written together once :data:`FLUSH_BYTES` accumulate,
    within :data:`FLUSH_SECONDS` by a background thread, at once for
    WARNING and above (the lines that explain a crash), and at exit.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._size = 0
        self._stop_flushing = threading.Event()
        self._flusher = threading.Thread(target=self._flush_often, name="log-flush", daemon=True)
        self._flusher.start()
        atexit.register(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line, urgent=record.levelno >= logging.WARNING)

    def write_line(self, line: str, *, urgent: bool = False) -> None:
        """Queue one formatted line (written at once when ``urgent``)."""
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES or urgent:
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if not self._lines:
                return
            lines, self._lines, self._size = self._lines, [], 0
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed (the reader went away): nothing to do about it
        finally:
            self.release()

    def _flush_often(self) -> None:
        while not self._stop_flushing.wait(FLUSH_SECONDS):
            self.flush()

    def close(self) -> None:
        self._stop_flushing.set()
        self.flush()
        super().close()


FLUSH_BYTES = 16 * 1024
"""Buffered log bytes that trigger a write."""

FLUSH_SECONDS = 0.1
"""Longest an INFO line waits in the buffer."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (newlines inside values are escaped)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self._redact = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = trace.format_trace_id(span_context.trace_id)
            entry["span_id"] = trace.format_span_id(span_context.span_id)
        texts = ["message"]
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in entry:
                entry[key] = value
                if isinstance(value, str):
                    texts.append(key)
        # One scan of all texts together (an access-log line has six); field by
        # field only when something in them may be a secret.
        if not self._redact.is_clean("\0".join(entry[key] for key in texts)):
            for key in texts:
                entry[key] = self._redact(entry[key])
        if record.exc_info:
            entry["exception"] = self._redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = self._redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = self._redact(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def span_fields(span_context: trace.SpanContext) -> str:
    """``, "trace_id": ..., "span_id": ...`` of a span, as :class:`JsonFormatter`
    writes them, or "" for an invalid one."""
    if not span_context.is_valid:
        return ""
    return (
        f', "trace_id": "{trace.format_trace_id(span_context.trace_id)}"'
        f', "span_id": "{trace.format_span_id(span_context.span_id)}"'
    )


def direct_handler(logger: logging.Logger) -> JsonLinesHandler | None:
    """The handler lines of ``logger`` end up in when that is only the process's
    JSON handler (no handler or filter of the logger's own on the way), so a hot
    path may write its lines straight to it; else None (use ``logger.log``)."""
    if logger.handlers or logger.filters or not logger.propagate:
        return None
    root = logging.root
    handlers = root.handlers
    if len(handlers) != 1 or root.filters:
        return None
    handler = handlers[0]
    return handler if isinstance(handler, JsonLinesHandler) and not handler.filters else None


def configure(level: str, secrets: Iterable[str] = (), stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (stdout) as JSON lines.

    Call once at start-up, before anything else logs. ``level`` is a
    ``logging`` level name (settings.log_level). ``secrets`` are literal
    values to mask wherever they appear (pass the Redis password and the
    password part of the Redis URL). Replaces any handlers already on the
    root logger, so libraries that called ``logging.basicConfig`` do not
    produce a second, plain-text copy; uncaught exceptions in the main
    thread and in other threads are logged as JSON too.
    """
    global _redactor  # noqa: PLW0603 - one process-wide redactor, set at start-up
    _redactor = Redactor(secrets)
    # The JSON lines show none of these, and each costs every record a call
    # (a system call for the process id, a stack walk for the caller).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]  # the logging HOWTO's "Optimization"
    handler = JsonLinesHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter(_redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("grpc._cython.cygrpc").addFilter(_cancelled_send)
    # Libraries that log a lot at INFO about their own plumbing stay at WARNING
    # unless the whole process runs at DEBUG.
    if level.upper() != "DEBUG":
        for noisy in ("grpc._cython", "grpc.aio", "urllib3", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _cancelled_send(record: logging.LogRecord) -> bool:
    """grpc.aio logs an ERROR with a traceback whenever a client cancels a
    server stream while a message is being sent (ExecuteBatchError). That is
    the client's normal right, not a server fault: keep it, at DEBUG."""
    if record.levelno >= logging.ERROR and "ExecuteBatchError" in record.getMessage():
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = None
        record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


def _log_uncaught(
    kind: type[BaseException], error: BaseException, tb: types.TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    logging.getLogger("activity_events").critical(
        "Uncaught exception: %s", error, exc_info=(kind, error, tb)
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("activity_events").critical(
        "Uncaught exception in thread %s: %s",
        args.thread.name if args.thread else "?",
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
