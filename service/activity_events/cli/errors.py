"""Exit codes of ``activity-client`` and the one exception its commands raise.

Commands never print tracebacks: anything that goes wrong becomes a
:class:`CliError` carrying a one-line message and the exit code a script can
rely on. The codes are part of the client's interface and are listed in every
``--help`` epilog (see :data:`EXIT_CODES_HELP`).
"""

from __future__ import annotations

from enum import IntEnum

import grpc


class ExitCode(IntEnum):
    """Process exit codes; stable, scripts branch on them."""

    OK = 0
    #: The server answered with an error (conflict, invalid argument, not
    #: found...), the service is not SERVING, some imported events were
    #: rejected, or a confirmation was declined.
    FAILED = 1
    #: Bad command line or bad input (malformed JSON, unknown field, missing file).
    USAGE = 2
    #: The server could not be reached or did not answer in time (UNAVAILABLE,
    #: DEADLINE_EXCEEDED): retrying later may succeed.
    UNAVAILABLE = 3
    #: The server refused the credentials: no or unknown token (UNAUTHENTICATED),
    #: or a token without the method's role (PERMISSION_DENIED). EX_NOPERM of
    #: sysexits.h; retrying will not help, a different token will.
    NOT_ALLOWED = 77
    #: Interrupted with Ctrl-C (except ``--follow``, where Ctrl-C is the normal end).
    INTERRUPTED = 130
    #: Standard output was closed early (``activity-client export ... | head``).
    BROKEN_PIPE = 141


EXIT_CODES_HELP = """\
exit codes:
  0    success (health: SERVING; --follow: stopped with Ctrl-C)
  1    the server answered with an error (status and message are printed),
       the service is not SERVING, imported events were rejected,
       or a confirmation was declined
  2    usage error or bad input (malformed JSON, unknown field, unreadable file)
  3    server unreachable or not answering within --timeout (retry later)
  77   not allowed: missing or unknown token (UNAUTHENTICATED), or the token
       lacks the role the command needs (PERMISSION_DENIED)
  130  interrupted with Ctrl-C
  141  standard output closed early (e.g. piped into head)"""

#: Status codes that mean "the service could not do it now", as opposed to
#: "the service refused": scripts should retry the former, not the latter.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

#: Status codes that mean "these credentials may not do this".
REFUSED_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class CliError(Exception):
    """A failure to report as one line on stderr, ending the process with ``code``."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.message = one_line(message)
        self.code = code


def one_line(text: str) -> str:
    """Collapse whitespace runs (newlines included) so a message stays on one line."""
    return " ".join(text.split())


def from_rpc_error(error: grpc.RpcError, context: str = "") -> CliError:
    """Turn a failed call into a :class:`CliError` naming the status and its message."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    if code in RETRYABLE_CODES:
        exit_code = ExitCode.UNAVAILABLE
    elif code in REFUSED_CODES:
        exit_code = ExitCode.NOT_ALLOWED
    else:
        exit_code = ExitCode.FAILED
    prefix = f"{context}: " if context else ""
    return CliError(f"{prefix}server error {code.name}: {details}", exit_code)
