"""``python -m activity_events.bench``: same as the ``activity-bench`` command."""

from activity_events.bench.cli import main

raise SystemExit(main())
