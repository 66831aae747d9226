"""Redis key names, built here and nowhere else.

All keys of one deployment share the hash tag ``{d:<id>}``, so the append
script may touch them together on Redis Cluster (one slot per deployment).
"""

from __future__ import annotations

PREFIX = "ae"

EVENTS = PREFIX + ":{{d:{0}}}:events"
"""Stream of one deployment's events; entry field ``e`` holds the EventRequest bytes."""

IDS = PREFIX + ":{{d:{0}}}:ids"
"""Hash: event id -> ``"<entry id> <message digest>"`` (the dedup index)."""

META = PREFIX + ":{{d:{0}}}:meta"
"""Hash: ``maxid`` (largest event id used) and ``trimmed`` (last entry id removed by retention)."""

DEPLOYMENTS = PREFIX + ":deployments"
"""Sorted set of known deployment ids (score = id), for "all deployments" listings."""

NEW_DEPLOYMENTS = PREFIX + ":deployments:new"
"""Short stream announcing deployments that received their first event, so hubs
following "all deployments" start reading them without polling."""

NOTIFY = PREFIX + ":notify"
"""Pub/Sub channel on which the append script names streams it appended to, on
Redis Cluster only: there a hub cannot block on streams of many slots at once."""

EVENT_FIELD = b"e"
"""Stream entry field holding the serialized EventRequest."""


def events(deployment_id: int) -> str:
    return EVENTS.format(deployment_id)


def ids(deployment_id: int) -> str:
    return IDS.format(deployment_id)


def meta(deployment_id: int) -> str:
    return META.format(deployment_id)


def deployment_keys(deployment_id: int) -> list[str]:
    """The keys the append and delete scripts take, in their KEYS order."""
    return [events(deployment_id), ids(deployment_id), meta(deployment_id)]


def deployment_of(events_key: str | bytes) -> int:
    """Inverse of :func:`events`: the deployment id in an events stream key."""
    text = events_key.decode() if isinstance(events_key, bytes) else events_key
    start = text.index("{d:") + 3
    return int(text[start : text.index("}", start)])


# -- durable subscriptions (consumer groups) ------------------------------------

SUBSCRIPTIONS = PREFIX + ":subscriptions"
"""Hash: subscription name -> its settings as JSON (deployment, start, timeouts).
The consumer groups themselves live on the events streams, named after the subscription."""

DEAD_LETTERS = PREFIX + ":{{d:{0}}}:dlq:{1}"
"""Stream of one subscription's dead letters of one deployment (same slot as its events)."""

REPLAYS = PREFIX + ":{{d:{0}}}:replay:{1}"
"""Stream of dead letters queued for delivery again; read by the subscription's group."""

REPLAYING = PREFIX + ":subscriptions:replaying:{0}"
"""Set of deployment ids whose replay stream a subscription's consumers must read."""


def dead_letters(deployment_id: int, subscription: str) -> str:
    return DEAD_LETTERS.format(deployment_id, subscription)


def replays(deployment_id: int, subscription: str) -> str:
    return REPLAYS.format(deployment_id, subscription)


def replaying(subscription: str) -> str:
    return REPLAYING.format(subscription)
