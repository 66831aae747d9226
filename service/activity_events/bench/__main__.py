"""``python -m activity_events.bench``: same as the ``activity-bench`` command."""

from activity_events.bench.cli import main

# Guarded: follower processes are spawned, and spawning re-imports the main module.
if __name__ == "__main__":
    raise SystemExit(main())
