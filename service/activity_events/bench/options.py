"""The knobs of one scenario run, and each scenario's defaults.

Defaults are the sizes the performance targets are stated at (issue 9):
create with 64 concurrent calls, replay of a 100k-event deployment, 1,000
followers over 10 deployments with a writer at 500 events/s, memory of 100k
32-byte events; overload at the load it is meant to survive (50 writers, 100
full-history readers of 200k events, 1,000 page viewers plus 1,000 followers,
a burst of 3,000 creates; see `activity_events.bench.overload`). Anything
given on the command line overrides them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from activity_events.bench.subscribe import SCENARIO_DEFAULTS as SUBSCRIBE_DEFAULTS

SCENARIOS = (
    "create", "ingest", "list", "replay", "follow", "memory", "subscribe", "overload",
)  # fmt: skip

# Deployment ids are int32; scenarios draw a random base in this range so that
# concurrent or repeated runs (and other users of a shared server) never share
# a deployment. 100k ids of headroom above the base for --deployments.
_BASE_LOW = 100_000_000
_BASE_HIGH = 2_000_000_000

DEFAULTS: dict[str, dict[str, Any]] = {
    "create": {"count": 20_000, "concurrency": 64, "connections": 4, "deployments": 1},
    "ingest": {
        "count": 200_000,
        "concurrency": 4,
        "connections": 2,
        "deployments": 1,
        "batch": 1000,
    },
    "list": {"count": 100_000, "concurrency": 1, "connections": 1, "deployments": 1},
    "replay": {"count": 100_000, "concurrency": 1, "connections": 1, "deployments": 1},
    "follow": {
        "count": 0,
        "concurrency": 64,
        "connections": 10,
        "deployments": 10,
        "followers": 1000,
        "rate": 500.0,
        "duration": 10.0,
        "processes": 2,
    },
    "memory": {"count": 100_000, "concurrency": 4, "connections": 2, "deployments": 1},
    # durable subscriptions: `concurrency` consumers acknowledging (bench_subscribe.py)
    "subscribe": dict(SUBSCRIBE_DEFAULTS),
    # overload: `count` events of history for the readers, `connections` writer channels;
    # concurrency is unused (writers, readers, viewers, followers and burst size the load).
    # Readers and page viewers are driven by h2load when it is installed (grpc.aio
    # readers and asyncio viewers otherwise, or with --client grpc).
    "overload": {
        "count": 200_000,
        "concurrency": 0,
        "connections": 4,
        "deployments": 1,
        "duration": 5.0,
        "processes": 2,
        "client": "h2load",
    },
}

COMMON_DEFAULTS: dict[str, Any] = {
    "message_size": 32,
    "batch": 1000,
    "followers": 1000,
    "rate": 500.0,
    "duration": 10.0,
    "fill_batch": 1000,
    "fill_concurrency": 4,
    "processes": 1,
    "writers": 50,
    "readers": 100,
    "viewers": 1000,
    "burst": 3000,
}


@dataclass(frozen=True)
class Options:
    """Everything a scenario needs to know; ``base`` is its first deployment id."""

    scenario: str
    target: str
    count: int
    concurrency: int
    connections: int
    message_size: int
    deployments: int
    batch: int
    followers: int
    rate: float
    duration: float
    fill_batch: int
    fill_concurrency: int
    base: int
    writers: int
    readers: int
    viewers: int
    burst: int
    redis_url: str | None = None
    metrics_url: str | None = None
    timeout: float = 30.0
    drain_timeout: float = 10.0
    cleanup: bool = True
    client: str = "grpc"
    processes: int = 1
    uvloop: bool = True

    @property
    def deployment_ids(self) -> list[int]:
        return [self.base + k for k in range(self.deployments)]


def random_base() -> int:
    return random.randrange(_BASE_LOW, _BASE_HIGH)


def resolve(scenario: str, given: dict[str, Any], *, target: str) -> Options:
    """Options for ``scenario``: command-line values where given, else its defaults."""
    values: dict[str, Any] = dict(COMMON_DEFAULTS)
    values.update(DEFAULTS[scenario])
    values.update({key: value for key, value in given.items() if value is not None})
    values.setdefault("base", None)
    if values["base"] is None:
        values["base"] = random_base()
    fields = set(Options.__dataclass_fields__)
    return Options(
        scenario=scenario,
        target=target,
        **{key: value for key, value in values.items() if key in fields and key != "scenario"},
    )


RUN_STRIDE = 100_000


def for_run(options: Options, run: int) -> Options:
    """The options of repetition ``run`` (0-based): same knobs, deployments of its own."""
    return replace(options, base=options.base + run * RUN_STRIDE)
