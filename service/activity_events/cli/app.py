"""Entry point of ``activity-client``: dispatch, and failures turned into exit codes.

Every failure ends as one line on standard error and an exit code from
:class:`~activity_events.cli.errors.ExitCode`; no traceback reaches the user.
The client uses gRPC's synchronous API: it starts in well under half a
second, and Ctrl-C interrupts a blocking stream read directly.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from activity_events.cli import admin, health, legacy, transfer
from activity_events.cli.arguments import PARSERS, legacy_parser, split_command
from activity_events.cli.console import Console
from activity_events.cli.errors import CliError, ExitCode

logger = logging.getLogger(__name__)

Runner = Callable[..., int]

RUNNERS: dict[str, Runner] = {
    "health": health.run,
    "deployments": admin.run_deployments,
    "delete": admin.run_delete,
    "export": transfer.run_export,
    "import": transfer.run_import,
}


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def run(argv: Sequence[str], console: Console) -> int:
    command, rest = split_command(argv)
    if command is None:
        parser = legacy_parser()
        if not rest:  # the original printed its flag help when called without flags
            console.data(parser.format_help().rstrip())
            return ExitCode.OK
        return legacy.run(parser.parse_args(rest), console)
    console.legacy = False
    args = PARSERS[command]().parse_args(rest)
    return RUNNERS[command](args, console)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console = Console(legacy=True)
    try:
        return int(run(argv, console))
    except CliError as error:
        console.error(error.message)
        return int(error.code)
    except KeyboardInterrupt:
        console.error("interrupted")
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        _silence_stdout()
        return int(ExitCode.BROKEN_PIPE)
    except Exception as error:  # the promise is one line, never a traceback
        logger.debug("unexpected failure", exc_info=True)
        console.error(f"unexpected error: {type(error).__name__}: {error}")
        return int(ExitCode.FAILED)
