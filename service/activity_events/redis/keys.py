"""Redis key names, built here and nowhere else.

All keys of one deployment share the hash tag ``{d:<id>}``, so the append
script may touch them together on Redis Cluster (one slot per deployment).
"""

from __future__ import annotations

PREFIX = "ae"

EVENTS = PREFIX + ":{{d:{0}}}:events"
"""Stream of one deployment's events; entry field ``e`` holds the EventRequest bytes."""

IDS = PREFIX + ":{{d:{0}}}:ids:{1}"
"""Dedup index bucket ``{1}`` (= event id >> BUCKET_BITS): a hash of the id's low
7 bits -> ``<6-byte message digest><varint entry time><varint entry seq>``, the
time relative to the deployment's first entry (append.lua has the details).
Buckets of at most 128 ids stay in Redis' compact listpack encoding: about 13
bytes an event, where one big hash of full ids and entry ids costs about 110."""

BUCKETS = PREFIX + ":{{d:{0}}}:buckets"
"""Set of the deployment's dedup bucket numbers, so a delete can name them all."""

BUCKET_BITS = 7
"""Ids per dedup bucket: 2**7 = 128, Redis' default hash-max-listpack-entries."""

META = PREFIX + ":{{d:{0}}}:meta"
"""Hash: ``maxid`` (largest event id used), ``trimmed`` (last entry id removed by
retention) and ``epoch`` (ms of the first entry id, the dedup index's time base)."""

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


def ids(deployment_id: int, bucket: int) -> str:
    return IDS.format(deployment_id, bucket)


def bucket_of(event_id: int) -> int:
    return event_id >> BUCKET_BITS


def buckets(deployment_id: int) -> str:
    return BUCKETS.format(deployment_id)


def meta(deployment_id: int) -> str:
    return META.format(deployment_id)


def deployment_keys(deployment_id: int) -> list[str]:
    """The fixed keys the append and delete scripts take first, in their KEYS
    order; the dedup buckets they touch follow."""
    return [events(deployment_id), meta(deployment_id), buckets(deployment_id)]


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
