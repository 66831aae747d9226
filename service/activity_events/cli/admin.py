"""``deployments`` and ``delete``: looking at and removing whole deployments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

import grpc

from activity_events.cli.connection import Connection, options_from_args
from activity_events.cli.console import Console
from activity_events.cli.errors import CliError, ExitCode, from_rpc_error
from activity_events.cli.formatting import format_time_ns, json_line, message_dict, shorten, table
from activity_events.pb import activityevents_pb2 as pb

#: Deployments asked for per ListDeployments page (the server allows up to 1000).
PAGE_SIZE = 500

#: Longest "last message" shown in the table; the full text is in --json.
MESSAGE_WIDTH = 60

#: Stops a server that keeps handing out tokens from looping the client forever.
MAX_PAGES = 100_000


def iter_deployments(connection: Connection) -> Iterator[pb.DeploymentInfo]:
    """Every deployment, following next_page_token until the last page."""
    token = ""
    for _ in range(MAX_PAGES):
        try:
            page = connection.stub.ListDeployments(
                pb.ListDeploymentsRequest(page_size=PAGE_SIZE, page_token=token),
                timeout=connection.timeout,
                metadata=connection.metadata(),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, "cannot list deployments") from None
        yield from page.deployments
        if not page.next_page_token or page.next_page_token == token:
            return
        token = page.next_page_token


def deployment_row(info: pb.DeploymentInfo) -> list[str]:
    return [
        str(info.id),
        str(info.event_count),
        format_time_ns(info.first_receive),
        format_time_ns(info.last_receive),
        shorten(info.last_event.event.message, MESSAGE_WIDTH),
    ]


DEPLOYMENT_HEADERS = ["DEPLOYMENT", "EVENTS", "FIRST EVENT", "LAST EVENT", "LAST MESSAGE"]
DEPLOYMENT_RIGHT = [True, True, False, False, False]


def run_deployments(args: argparse.Namespace, console: Console) -> int:
    options = options_from_args(args)
    with Connection(options) as connection:
        connection.wait_ready()
        rows = []
        for info in iter_deployments(connection):
            if args.json:
                console.data(json_line(message_dict(info)))
            else:
                rows.append(deployment_row(info))
    if not args.json:
        if rows:
            console.data(table(DEPLOYMENT_HEADERS, rows, DEPLOYMENT_RIGHT))
        else:
            console.info("no deployments")
    return ExitCode.OK


def confirm(question: str, stdin: TextIO, err: TextIO) -> bool:
    """Ask on the terminal; only an explicit yes counts."""
    err.write(f"{question} [y/N] ")
    err.flush()
    answer = stdin.readline()
    return answer.strip().lower() in {"y", "yes"}


def run_delete(args: argparse.Namespace, console: Console, stdin: TextIO | None = None) -> int:
    stdin = stdin if stdin is not None else sys.stdin
    if not args.yes:
        if not stdin.isatty():
            raise CliError(
                f"refusing to delete deployment {args.deployment} without --yes: "
                "standard input is not a terminal",
                ExitCode.USAGE,
            )
        question = f"Delete deployment {args.deployment} and all its events? This cannot be undone."
        if not confirm(question, stdin, console.err):
            raise CliError("aborted; nothing was deleted", ExitCode.FAILED)
    options = options_from_args(args)
    with Connection(options) as connection:
        connection.wait_ready()
        try:
            response = connection.stub.DeleteDeployment(
                pb.DeleteDeploymentRequest(deployment_id=args.deployment),
                timeout=connection.timeout,
                metadata=connection.metadata(),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, f"cannot delete deployment {args.deployment}") from None
    if args.json:
        console.data(
            json_line({"deployment_id": args.deployment, "deleted_events": response.deleted_events})
        )
    else:
        console.data(f"deleted deployment {args.deployment}: {response.deleted_events} events")
    return ExitCode.OK
