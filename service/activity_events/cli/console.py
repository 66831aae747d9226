"""Where the client's output goes, and in which dress.

Legacy-style commands (``-add``, ``-deployment``) speak like the original Go
client: logrus terminal lines (``INFO[0000] ...``) on standard error, which is
where logrus writes by default. New commands print their results on standard
output and their problems as ``error: ...`` on standard error. ``--json``
output always goes to standard output, one object per line.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from activity_events.cli.formatting import logrus_line

#: logrus measures ``[0004]`` from the moment the program started; the closest
#: equivalent here is the import of this module, at the very start of main.
_STARTED = time.monotonic()


def wants_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    return stream.isatty() and "NO_COLOR" not in os.environ


class Console:
    """The client's two output streams plus the style of its messages."""

    def __init__(
        self, out: TextIO | None = None, err: TextIO | None = None, legacy: bool = False
    ) -> None:
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.legacy = legacy

    def log(self, level: str, message: str) -> None:
        """A logrus-style line on stderr (legacy commands' normal output)."""
        line = logrus_line(level, message, time.monotonic() - _STARTED, wants_colour(self.err))
        print(line, file=self.err, flush=True)

    def info(self, message: str) -> None:
        """Progress or result meant for people: logrus INFO in legacy mode, plain otherwise."""
        if self.legacy:
            self.log("info", message)
        else:
            print(message, file=self.err, flush=True)

    def error(self, message: str) -> None:
        """The one line that explains a failure."""
        if self.legacy:
            self.log("error", message)
        else:
            print(f"error: {message}", file=self.err, flush=True)

    def data(self, line: str) -> None:
        """A result line on stdout (JSON lines, tables, summaries)."""
        print(line, file=self.out, flush=True)
