"""The Lua scripts (``scripts/*.lua``), run by SHA and loaded again on NOSCRIPT.

Scripts vanish from Redis on a restart, a failover or ``SCRIPT FLUSH``; every
call here sends EVALSHA and, on NOSCRIPT, loads the source and sends again,
so callers never see the difference. Each ``.lua`` file starts with a header
naming every KEYS and ARGV entry and the reply; ``lib.lua`` (shared helpers)
is prepended to each.

Their reply codes are named here, once, for the Python side:
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis import exceptions as rexc

# append.lua: one (code, event id, entry id) triple per event.
CREATED = 0
DUPLICATE = 1
CONFLICT = 2
NO_FREE_ID = 3
NEED_BUCKET = 4
"""The event's dedup bucket was not among the script's KEYS: re-send from that id."""

# delete.lua
DELETE_UNKNOWN = -1
"""The deployment has no events."""
DELETE_RACED = -2
"""The bucket set changed since the caller read it: read it again and retry."""


def _source(name: str) -> str:
    scripts = resources.files(__package__).joinpath("scripts")
    return scripts.joinpath("lib.lua").read_text() + "\n" + scripts.joinpath(name).read_text()


class LuaScript:
    """One script: its source and SHA, run with transparent NOSCRIPT reload."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = _source(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(
        self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


class Sender(Protocol):
    """What :func:`run_pipelined` needs of a lane (``redis.lanes.Lane``)."""

    async def send(self, commands: Sequence[Sequence[Any]]) -> list[Any]: ...

    async def load_script(self, source: str) -> None: ...


async def run_pipelined(
    lane: Sender,
    script: LuaScript,
    calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
    *,
    before: Sequence[Sequence[Any]] = (),
    after: Sequence[Sequence[Any]] = (),
) -> tuple[list[Any], list[Any], list[Any]]:
    """EVALSHA ``script`` once per ``(keys, args)`` in one round trip on ``lane``
    (:meth:`~activity_events.redis.lanes.Lane.send`).

    ``before`` and ``after`` are raw commands sent around the calls in the
    same round trip (say, an index ZADD before and a WAIT after). Returns the
    replies of ``before``, of the calls (in order) and of ``after``, errors as
    exception objects for the caller to judge. Calls that met NOSCRIPT are
    sent again, with ``before`` and ``after``, once the script is loaded.
    """
    replies: list[Any] = [None] * len(calls)
    pending = list(range(len(calls)))
    head: list[Any] = []
    tail: list[Any] = []
    for attempt in range(2):
        commands: list[Sequence[Any]] = list(before)
        for i in pending:
            keys, args = calls[i]
            commands.append(("EVALSHA", script.sha, len(keys), *keys, *args))
        commands.extend(after)
        out = await lane.send(commands)
        head, tail = out[: len(before)], out[len(out) - len(after) :] if after else []
        missing = []
        for i, reply in zip(pending, out[len(before) : len(out) - len(after)], strict=True):
            if isinstance(reply, rexc.NoScriptError) and attempt == 0:
                missing.append(i)
            else:
                replies[i] = reply
        if not missing:
            break
        await lane.load_script(script.source)
        pending = missing
    return head, replies, tail
