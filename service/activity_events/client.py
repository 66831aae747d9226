"""``activity-client``: the command-line client of the ActivityEvents service.

Keeps the original Go client's flags and output (``-add JSON``,
``-deployment N``, ``-address``, ``-port``) and adds ``--follow``,
``--after``, ``--limit``, ``--json`` and the commands ``health``,
``deployments``, ``delete``, ``export`` and ``import``. The implementation
lives in :mod:`activity_events.cli`; this module is the stable entry point
(console script and ``python -m activity_events.client``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

#: Exit code of a Ctrl-C (128 + SIGINT), see activity_events.cli.errors.ExitCode.
INTERRUPTED = 130

#: gRPC's core logs a failed TLS handshake (and more) on stderr at INFO level,
#: which would break the client's one-line error promise; the client explains
#: failures itself. Set GRPC_VERBOSITY=INFO (or DEBUG) to see them anyway.
GRPC_VERBOSITY = "NONE"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client; Ctrl-C while its modules load still exits 130 without a traceback."""
    os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY)  # read when grpc is first imported
    try:
        from activity_events.cli.app import main as run  # noqa: PLC0415
    except KeyboardInterrupt:
        return INTERRUPTED
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
