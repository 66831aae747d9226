"""Command-line grammar: the legacy flags and the subcommands.

The original client used Go's ``flag`` package, which takes ``-flag`` and
``--flag`` alike, and ``-flag value`` as well as ``-flag=value``. Every flag
here therefore has a single-dash and a double-dash spelling. Subcommands come
first (``activity-client health --port 50051``); connection flags may also
precede them (``activity-client --port 50051 health``), see :func:`split_command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from activity_events.cli.errors import EXIT_CODES_HELP, CliError, ExitCode
from activity_events.domain.limits import INT32_MAX

PROG = "activity-client"

#: int32 bounds of the wire contract's ids.

#: Flags that take a value and may stand before a subcommand.
CONNECTION_FLAGS = (
    "address",
    "port",
    "timeout",
    "token",
    "token-file",
    "cacert",
    "cert",
    "key",
    "server-name",
)

#: Flags without a value that may stand before a subcommand.
CONNECTION_SWITCHES = ("tls",)

COMMANDS = ("health", "deployments", "delete", "export", "import")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports usage errors as a :class:`CliError` (one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)", ExitCode.USAGE)


def _ranged_int(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


deployment_id = _ranged_int(0, INT32_MAX, "a deployment id (0 to 2147483647)")
positive_deployment_id = _ranged_int(1, INT32_MAX, "a deployment id (1 to 2147483647)")
port_number = _ranged_int(0, 65535, "a port (0 to 65535)")
limit_count = _ranged_int(0, INT32_MAX, "a limit (0 means none)")
batch_size = _ranged_int(1, 1000, "a batch size (1 to 1000)")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be more than 0 seconds")
    return value


def _flag(parser: argparse._ActionsContainer, name: str, **kwargs: Any) -> None:
    """Add ``-name`` and ``--name`` (Go flag style: both spellings mean the same)."""
    parser.add_argument(f"-{name}", f"--{name}", **kwargs)


def add_connection_arguments(parser: argparse.ArgumentParser, timeout: float = 5.0) -> None:
    group = parser.add_argument_group("connection")
    _flag(
        group,
        "address",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="server host, host:port, or gRPC target such as dns:///svc:50051 "
        "(dns: targets use round-robin load balancing) (default: %(default)s)",
    )
    _flag(
        group,
        "port",
        type=port_number,
        default=50051,
        metavar="PORT",
        help="server port, used when --address has none (default: %(default)s)",
    )
    _flag(
        group,
        "timeout",
        type=seconds,
        default=timeout,
        metavar="SECONDS",
        help="time to connect and for each request (default: %(default)s)",
    )
    security = parser.add_argument_group(
        "security",
        "A token is sent as 'authorization: Bearer <token>' on every call. Prefer the "
        "ACTIVITY_TOKEN environment variable or --token-file to --token: other users "
        "of the machine can read command lines (ps). ACTIVITY_TLS=1 acts as --tls.",
    )
    _flag(
        security,
        "token",
        metavar="TOKEN",
        help="bearer token (default: $ACTIVITY_TOKEN; visible in ps, prefer the variable)",
    )
    _flag(
        security,
        "token-file",
        metavar="PATH",
        help="read the bearer token from the first line of this file",
    )
    _flag(security, "tls", action="store_true", help="use TLS, verifying with the system roots")
    _flag(
        security,
        "cacert",
        metavar="PATH",
        help="PEM CA bundle that verifies the server (implies --tls)",
    )
    _flag(
        security,
        "cert",
        metavar="PATH",
        help="PEM client certificate for mutual TLS (with --key; implies --tls)",
    )
    _flag(security, "key", metavar="PATH", help="PEM private key of --cert")
    _flag(
        security,
        "server-name",
        metavar="NAME",
        help="check the server certificate against NAME instead of the address's host",
    )


def _parser(prog: str, description: str, examples: str) -> Parser:
    return Parser(
        prog=prog,
        description=description,
        epilog=f"examples:\n{examples}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


LEGACY_EXAMPLES = f"""\
  {PROG} -add '{{"id":1, "deployment_id": 1, "message":"Deployment has been created"}}'
  {PROG} -deployment 1                      # history, as the original client printed it
  {PROG} -deployment 0                      # all deployments, in arrival order
  {PROG} -deployment 1 --follow             # history, then new events until Ctrl-C
  {PROG} -deployment 1 --after 1:1764370000000-0 --limit 100 --json
  {PROG} health                             # exit 0 when SERVING (container HEALTHCHECK)

commands (each has --help):
  health       check the server's health status
  deployments  list deployments with event counts and times
  delete       delete a deployment and all its events
  export       write a deployment's events as JSON lines
  import       store events from a JSON lines file (idempotent)

Legacy output (-add, -deployment) goes to standard error as logrus lines,
like the original client's; --json output goes to standard output.
Plain -deployment N lists with ListEvents, as the original did; --follow,
--after, --limit and --json list with WatchEvents and add each event's cursor.
Without any argument this help is printed (exit 0), as the original did."""


def legacy_parser() -> Parser:
    parser = _parser(
        PROG,
        "Client of the ActivityEvents service: add events, list and follow them.",
        LEGACY_EXAMPLES,
    )
    _flag(parser, "add", metavar="JSON", help="event to add, as JSON (id, deployment_id, message)")
    _flag(
        parser,
        "deployment",
        type=deployment_id,
        metavar="N",
        help="stream the events of deployment N (0: all deployments)",
    )
    watch = parser.add_argument_group("with -deployment (new)")
    _flag(
        watch,
        "follow",
        action="store_true",
        help="after the history, print new events until Ctrl-C",
    )
    _flag(watch, "after", metavar="CURSOR", default="", help="start after this cursor")
    _flag(watch, "limit", type=limit_count, default=0, metavar="N", help="stop after N events")
    _flag(watch, "json", action="store_true", help="print one JSON object per line on stdout")
    add_connection_arguments(parser)
    return parser


def health_parser() -> Parser:
    parser = _parser(
        f"{PROG} health",
        "Ask the server's grpc.health.v1 service for its status. Prints the status "
        "and exits 0 when SERVING, 1 otherwise (also when nothing answers): usable "
        "as a container HEALTHCHECK.",
        f"""\
  {PROG} health
  {PROG} health --service activityevents.ActivityEvents --port 50051
  HEALTHCHECK CMD ["{PROG}", "health", "--timeout", "2"]""",
    )
    _flag(
        parser,
        "service",
        default="",
        metavar="NAME",
        help='service to check (default: "", the server as a whole)',
    )
    _flag(parser, "json", action="store_true", help="print the result as one JSON object")
    add_connection_arguments(parser, timeout=2.0)
    return parser


def deployments_parser() -> Parser:
    parser = _parser(
        f"{PROG} deployments",
        "List the known deployments: event count, first and last event time "
        "(local time zone), last message.",
        f"""\
  {PROG} deployments
  {PROG} deployments --json | jq -r .id""",
    )
    _flag(parser, "json", action="store_true", help="one JSON object per deployment and line")
    add_connection_arguments(parser)
    return parser


def delete_parser() -> Parser:
    parser = _parser(
        f"{PROG} delete",
        "Delete a deployment: its events, dedup index and metadata, atomically. "
        "Asks for confirmation on a terminal; without a terminal it refuses unless --yes.",
        f"""\
  {PROG} delete --deployment 42
  {PROG} delete --deployment 42 --yes        # scripts""",
    )
    _flag(
        parser,
        "deployment",
        type=positive_deployment_id,
        required=True,
        metavar="N",
        help="deployment to delete",
    )
    _flag(parser, "yes", action="store_true", help="do not ask for confirmation")
    _flag(parser, "json", action="store_true", help="print the result as one JSON object")
    add_connection_arguments(parser)
    return parser


def export_parser() -> Parser:
    parser = _parser(
        f"{PROG} export",
        "Write a deployment's stored events to standard output as JSON lines: each "
        "line is the event's proto3 JSON plus its cursor. The file can be read back "
        "with import.",
        f"""\
  {PROG} export --deployment 42 > events.jsonl
  {PROG} export --deployment 42 --after "$(tail -n1 events.jsonl | jq -r .cursor)" >> events.jsonl
  {PROG} export --deployment 0 > all.jsonl    # all deployments""",
    )
    _flag(
        parser,
        "deployment",
        type=deployment_id,
        required=True,
        metavar="N",
        help="deployment to export (0: all deployments)",
    )
    _flag(parser, "after", default="", metavar="CURSOR", help="start after this cursor")
    _flag(parser, "limit", type=limit_count, default=0, metavar="N", help="stop after N events")
    _flag(parser, "json", action="store_true", help="accepted for symmetry: output is JSON lines")
    add_connection_arguments(parser)
    return parser


def import_parser() -> Parser:
    parser = _parser(
        f"{PROG} import",
        "Store the events of a JSON lines file (as written by export) through "
        "CreateEvents, in batches. Idempotent: events already stored are counted as "
        "duplicates and not written again. Shows a progress bar when standard error "
        "is a terminal. Prints a summary: created, duplicates, conflicts and invalid "
        "lines with their line numbers.",
        f"""\
  {PROG} import events.jsonl
  {PROG} import events.jsonl --deployment 43   # into another deployment
  {PROG} export --deployment 1 | {PROG} import - --deployment 2""",
    )
    parser.add_argument("file", metavar="FILE", help='JSON lines file; "-" reads standard input')
    _flag(
        parser,
        "deployment",
        type=positive_deployment_id,
        metavar="N",
        help="store every event into deployment N instead of its own",
    )
    _flag(
        parser,
        "batch-size",
        type=batch_size,
        default=500,
        metavar="N",
        help="events per CreateEvents call (default: %(default)s)",
    )
    _flag(parser, "json", action="store_true", help="print the summary as one JSON object")
    _flag(parser, "no-progress", action="store_true", help="never show the progress bar")
    add_connection_arguments(parser)
    return parser


PARSERS: dict[str, Callable[[], Parser]] = {
    "health": health_parser,
    "deployments": deployments_parser,
    "delete": delete_parser,
    "export": export_parser,
    "import": import_parser,
}


def _is_connection_flag(token: str) -> tuple[bool, bool]:
    """(is a connection flag, it needs no further argument: a switch or ``--flag=value``)."""
    name, has_value, _ = token.lstrip("-").partition("=")
    if not token.startswith("-"):
        return False, False
    if name in CONNECTION_SWITCHES and not has_value:
        return True, True
    if name in CONNECTION_FLAGS:
        return True, bool(has_value)
    return False, False


def split_command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Find the subcommand, allowing connection flags before it.

    Returns ``(command, remaining arguments)``; ``command`` is None for the
    legacy flag interface.
    """
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in COMMANDS:
            return token, [*argv[index + 1 :], *argv[:index]]
        is_flag, inline = _is_connection_flag(token)
        if not is_flag:
            break
        index += 1 if inline else 2
    return None, list(argv)
