"""activity-events: deployment activity events on Redis Streams, served over gRPC."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("activity-events")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

SERVICE_NAME = "activityevents.ActivityEvents"
"""Full gRPC service name, as health checks and metrics label it."""
