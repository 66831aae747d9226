"""Every exception the service raises on purpose, in one place.

Domain and store code raise these; only the call pipeline (and the HTTP side)
turns them into a status, through one table each
(:data:`activity_events.grpc.errors.STATUS`). Every message is safe to show
to clients: it names the field or the limit, never internals.
"""

from __future__ import annotations


class ActivityError(Exception):
    """Base of all deliberate errors; the message is safe to show to clients."""


class InvalidArgument(ActivityError):
    """A request field is malformed or out of range. The message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class Conflict(ActivityError):
    """The event id is already taken by an event with a different message."""


class NotFound(ActivityError):
    """The named deployment does not exist."""


class OutOfRange(ActivityError):
    """A cursor points before the retained history: events after it were trimmed."""


class Exhausted(ActivityError):
    """A limit was reached (no free event id, too many calls or followers)."""


class Overloaded(Exhausted):
    """Load shed on purpose: a budget of the call's class is used up.

    ``call_class`` is the admission class (writes, reads, streams, health),
    ``reason`` what ran out (``inflight``, ``streams``, ``followers``,
    ``redis_pool``...), as the ``activity_load_shed_total`` labels say. The
    message names the setting that sets the limit, so an operator knows
    what to raise, and a client knows to back off.
    """

    def __init__(self, call_class: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.call_class = call_class
        self.reason = reason


class FollowerLagged(Exhausted):
    """A follower fell further behind than its queue holds; it may resume from last_cursor."""

    def __init__(self, last_cursor: str | None) -> None:
        shown = last_cursor or "none"
        super().__init__(
            f"follower fell too far behind and was dropped; resume with after={shown} "
            f"(last cursor {shown})"
        )
        self.last_cursor = last_cursor


class Stalled(Exhausted):
    """A stream whose client stopped reading was ended (``stream_stall_seconds``)."""


class Corrupt(ActivityError):
    """Stored data is not what this service writes (e.g. a stream entry without
    its event field, written by something else)."""


class StoreUnavailable(ActivityError):
    """Redis could not be reached or answered in time; the call may be retried."""


class NotReplicated(StoreUnavailable):
    """The write reached the primary but not enough replicas in time (Redis WAIT)."""


class ShuttingDown(StoreUnavailable):
    """The server is draining; retry on another replica."""


class Unauthenticated(ActivityError):
    """No bearer token, or one the token file does not hold (never echoed)."""


class PermissionDenied(ActivityError):
    """A known token without the role the method needs."""


class DeadlineExceeded(ActivityError):
    """The caller's deadline had passed before the call could start."""
