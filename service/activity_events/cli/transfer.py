"""``export`` and ``import``: moving events in and out as JSON lines.

An exported line is the event's proto3 JSON plus its ``cursor``; import reads
the same lines back (ignoring ``cursor``) and stores them through
CreateEvents in batches. Because the server deduplicates on
(deployment_id, id), importing a file twice stores nothing new, and an import
that was interrupted can simply be run again.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import grpc

from activity_events.cli.connection import Connection, options_from_args
from activity_events.cli.console import Console
from activity_events.cli.errors import CliError, ExitCode, from_rpc_error
from activity_events.cli.event_input import EXPORT_ONLY_KEYS, EventInputError, event_from_json
from activity_events.cli.formatting import event_json, json_line, line_list
from activity_events.cli.progress import ProgressBar
from activity_events.pb import activityevents_pb2 as pb

#: Keeps one CreateEvents request well under the server's 4 MiB default
#: receive limit even when events carry 64 KiB messages.
MAX_BATCH_BYTES = 2 * 1024 * 1024

#: At most this many rejected lines are described one by one on stderr.
MAX_REPORTED_LINES = 20


def run_export(args: argparse.Namespace, console: Console) -> int:
    request = pb.WatchEventsRequest(
        deployment_id=args.deployment, after=args.after, limit=args.limit, follow=False
    )
    options = options_from_args(args)
    count = 0
    last_cursor = ""
    with Connection(options) as connection:
        connection.wait_ready()
        call = connection.stub.WatchEvents(request, metadata=connection.metadata())
        try:
            for response in call:
                for stored in response.events:
                    console.out.write(event_json(stored.event, stored.cursor) + "\n")
                    count += 1
                    last_cursor = stored.cursor
        except grpc.RpcError as error:
            failure = from_rpc_error(error, "export failed")
            if last_cursor:
                failure.message += f" after {count} events (resume with --after {last_cursor})"
            raise failure from None
        finally:
            call.cancel()
    console.out.flush()
    suffix = f" (last cursor {last_cursor})" if last_cursor else ""
    console.info(f"exported {count} events{suffix}")
    return ExitCode.OK


@dataclass
class ImportSummary:
    """What happened to each line of an import."""

    source: str
    created: int = 0
    duplicates: int = 0
    conflicts: list[tuple[int, str]] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)

    @property
    def events(self) -> int:
        return self.created + self.duplicates + len(self.conflicts) + len(self.invalid)

    @property
    def rejected(self) -> bool:
        return bool(self.conflicts or self.invalid)

    def line(self) -> str:
        """The human summary, one line, with the rejected line numbers."""
        text = (
            f"{self.source}: {self.created} created, {self.duplicates} duplicates, "
            f"{len(self.conflicts)} conflicts, {len(self.invalid)} invalid"
        )
        if self.conflicts:
            text += f"; conflicts at lines {line_list([n for n, _ in self.conflicts])}"
        if self.invalid:
            text += f"; invalid at lines {line_list([n for n, _ in self.invalid])}"
        return text

    def as_json(self) -> str:
        return json_line(
            {
                "source": self.source,
                "created": self.created,
                "duplicates": self.duplicates,
                "conflicts": [{"line": n, "reason": r} for n, r in self.conflicts],
                "invalid": [{"line": n, "reason": r} for n, r in self.invalid],
            }
        )


@dataclass
class ParsedLine:
    number: int
    event: pb.EventRequest | None
    error: str = ""


def read_lines(stream: BinaryIO, deployment: int | None) -> Iterator[tuple[ParsedLine, int]]:
    """Parse a JSON lines stream: (parsed line, bytes consumed so far); blank lines skipped."""
    consumed = 0
    for number, raw in enumerate(stream, start=1):
        consumed += len(raw)
        if not raw.strip():
            continue
        try:
            event = event_from_json(raw.decode("utf-8"), ignore=EXPORT_ONLY_KEYS)
        except UnicodeDecodeError:
            yield ParsedLine(number, None, "not UTF-8"), consumed
            continue
        except EventInputError as error:
            yield ParsedLine(number, None, str(error)), consumed
            continue
        if deployment is not None:
            event.deployment_id = deployment
        yield ParsedLine(number, event), consumed


class Importer:
    """Sends parsed lines in batches and tallies the per-event results."""

    def __init__(self, connection: Connection, summary: ImportSummary, batch_size: int) -> None:
        self.connection = connection
        self.summary = summary
        self.batch_size = batch_size
        self._batch: list[ParsedLine] = []
        self._batch_bytes = 0

    def add(self, parsed: ParsedLine) -> None:
        if parsed.event is None:
            self.summary.invalid.append((parsed.number, parsed.error))
            return
        size = parsed.event.ByteSize()
        if self._batch and self._batch_bytes + size > MAX_BATCH_BYTES:
            self.flush()
        self._batch.append(parsed)
        self._batch_bytes += size
        if len(self._batch) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        request = pb.CreateEventsRequest(events=[line.event for line in batch if line.event])
        try:
            response = self.connection.stub.CreateEvents(
                request, timeout=self.connection.timeout, metadata=self.connection.metadata()
            )
        except grpc.RpcError as error:
            first = batch[0].number
            raise from_rpc_error(
                error, f"import stopped at line {first} ({self.summary.created} created so far)"
            ) from None
        for result in response.results:
            if not 0 <= result.index < len(batch):
                continue
            number = batch[result.index].number
            if result.outcome == pb.OUTCOME_CREATED:
                self.summary.created += 1
            elif result.outcome == pb.OUTCOME_DUPLICATE:
                self.summary.duplicates += 1
            elif result.outcome == pb.OUTCOME_CONFLICT:
                self.summary.conflicts.append((number, result.reason or "conflict"))
            else:
                self.summary.invalid.append((number, result.reason or "invalid"))


def _open_source(path: str) -> tuple[BinaryIO, int | None]:
    if path == "-":
        return sys.stdin.buffer, None
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by run_import
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}", ExitCode.USAGE) from None
    size = os.fstat(stream.fileno()).st_size
    return stream, size or None


def run_import(args: argparse.Namespace, console: Console) -> int:
    options = options_from_args(args)
    stream, total = _open_source(args.file)
    source = "stdin" if args.file == "-" else args.file
    summary = ImportSummary(source)
    progress = ProgressBar(
        console.err, "import", total, enabled=console.err.isatty() and not args.no_progress
    )
    try:
        with Connection(options) as connection:
            connection.wait_ready()
            importer = Importer(connection, summary, args.batch_size)
            lines = 0
            for parsed, consumed in read_lines(stream, args.deployment):
                importer.add(parsed)
                lines += 1
                progress.update(consumed, lines)
            importer.flush()
            progress.update(total or 0, lines, force=True)
    finally:
        progress.close()
        if stream is not sys.stdin.buffer:
            stream.close()
    rejected = sorted(summary.conflicts + summary.invalid)
    for number, reason in rejected[:MAX_REPORTED_LINES]:
        kind = "conflict" if (number, reason) in summary.conflicts else "invalid"
        console.info(f"line {number}: {kind}: {reason}")
    if len(rejected) > MAX_REPORTED_LINES:
        console.info(f"... and {len(rejected) - MAX_REPORTED_LINES} more rejected lines")
    console.data(summary.as_json() if args.json else summary.line())
    return ExitCode.FAILED if summary.rejected else ExitCode.OK
