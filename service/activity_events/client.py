"""``activity-client``: the command-line client of the ActivityEvents service.

Keeps the original Go client's flags and output (``-add JSON``,
``-deployment N``, ``-address``, ``-port``) and adds ``--follow``,
``--after``, ``--limit``, ``--json`` and the commands ``health``,
``deployments``, ``delete``, ``export`` and ``import``. The implementation
lives in :mod:`activity_events.cli`; this module is the stable entry point
(console script and ``python -m activity_events.client``).
"""

from __future__ import annotations

import sys

from activity_events.cli.app import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
