"""The original client's interface: ``-add JSON`` and ``-deployment N``.

``-add`` calls CreateEvent; plain ``-deployment N`` calls ListEvents and
prints every event as the original did. The new flags (``--follow``,
``--after``, ``--limit``, ``--json``) switch the listing to WatchEvents, which
knows cursors, limits and live follow.
"""

from __future__ import annotations

import argparse
import logging
import signal

import grpc

from activity_events.cli.connection import Connection, options_from_args
from activity_events.cli.console import Console
from activity_events.cli.errors import CliError, ExitCode, from_rpc_error
from activity_events.cli.event_input import EventInputError, event_from_json, stamp_send_time
from activity_events.cli.formatting import (
    created_line,
    event_json,
    event_line,
    json_line,
    message_dict,
)
from activity_events.pb import activityevents_pb2 as pb

logger = logging.getLogger(__name__)


def uses_watch(args: argparse.Namespace) -> bool:
    """Any new listing flag selects WatchEvents; none keeps legacy ListEvents."""
    return bool(args.follow or args.after or args.limit or args.json)


def run(args: argparse.Namespace, console: Console) -> int:
    if args.add is None and args.deployment is None:
        if uses_watch(args):
            raise CliError(
                "--follow, --after, --limit and --json need -deployment N", ExitCode.USAGE
            )
        raise CliError("nothing to do: give -add JSON or -deployment N", ExitCode.USAGE)
    event = None
    if args.add is not None:
        try:
            event = event_from_json(args.add)
        except EventInputError as error:
            raise CliError(f"bad -add event: {error}", ExitCode.USAGE) from None
        stamp_send_time(event)
    options = options_from_args(args)
    with Connection(options) as connection:
        connection.wait_ready()
        if event is not None:
            add(connection, console, event, as_json=args.json)
        if args.deployment is not None:
            if uses_watch(args):
                return watch(connection, console, args)
            list_events(connection, console, args.deployment)
    return ExitCode.OK


def add(connection: Connection, console: Console, event: pb.EventRequest, as_json: bool) -> None:
    try:
        response = connection.stub.CreateEvent(
            event, timeout=connection.timeout, metadata=connection.metadata()
        )
    except grpc.RpcError as error:
        raise from_rpc_error(error, "cannot add the event") from None
    if as_json:
        data = message_dict(response)
        data["deployment_id"] = event.deployment_id
        console.data(json_line(data))
    else:
        console.info(
            created_line(
                response.id, event.deployment_id, response.execution_time, response.duplicate
            )
        )
    if not response.success:
        raise CliError("the server did not store the event (success=false)")


def list_events(connection: Connection, console: Console, deployment: int) -> None:
    """Legacy listing: one ``Event: ...`` line per stored event, then the stream ends."""
    call = connection.stub.ListEvents(pb.Deployment(id=deployment), metadata=connection.metadata())
    try:
        for event in call:
            console.info(event_line(event))
    except grpc.RpcError as error:
        raise from_rpc_error(error, "cannot list events") from None
    finally:
        call.cancel()


def watch(connection: Connection, console: Console, args: argparse.Namespace) -> int:
    """WatchEvents: history after ``--after``, up to ``--limit``, then live with ``--follow``.

    Ctrl-C is the normal way to end ``--follow`` and exits 0. When the stream
    fails midway, the error names the last cursor printed so the user can
    resume with ``--after`` without gaps or repeats.
    """
    request = pb.WatchEventsRequest(
        deployment_id=args.deployment, after=args.after, limit=args.limit, follow=args.follow
    )
    if args.follow:
        # A shell without job control starts background commands with SIGINT
        # ignored, and Python then keeps it ignored; following must always
        # be stoppable with SIGINT.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    call = connection.stub.WatchEvents(request, metadata=connection.metadata())
    last_cursor = ""
    try:
        for response in call:
            for stored in response.events:
                if args.json:
                    console.data(event_json(stored.event, stored.cursor))
                else:
                    console.info(event_line(stored.event, stored.cursor))
                last_cursor = stored.cursor
            if response.caught_up and not args.json:
                console.info("Caught up; waiting for new events (Ctrl-C to stop)")
    except KeyboardInterrupt:
        call.cancel()
        if args.follow:
            return ExitCode.OK
        raise
    except grpc.RpcError as error:
        failure = from_rpc_error(error, "the event stream failed")
        if last_cursor:
            failure.message += f" (resume with --after {last_cursor})"
        raise failure from None
    if args.follow and not args.limit:
        resume = f"; resume with --after {last_cursor}" if last_cursor else ""
        console.info(f"The server ended the stream{resume}")
    return ExitCode.OK
