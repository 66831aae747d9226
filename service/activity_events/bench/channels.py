"""A fixed set of gRPC channels, each its own TCP connection.

Channels with identical arguments share one connection in gRPC core (the
global subchannel pool); ``grpc.use_local_subchannel_pool`` gives each
channel its own, which is what ``--connections`` promises.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from activity_events.pb import activityevents_pb2_grpc as pb_grpc

_MAX_MESSAGE = 64 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
]


class ChannelPool:
    """``size`` channels to ``target`` and one stub per channel, picked round-robin."""

    def __init__(self, target: str, size: int) -> None:
        self.target = target
        self._channels = [
            grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(max(1, size))
        ]
        self._stubs: list[Any] = [
            pb_grpc.ActivityEventsStub(ch)  # type: ignore[no-untyped-call]
            for ch in self._channels
        ]

    def __len__(self) -> int:
        return len(self._channels)

    def stub(self, index: int) -> Any:
        """The stub of channel ``index % size``: callers pin work to a connection by index."""
        return self._stubs[index % len(self._stubs)]

    def channel(self, index: int) -> grpc.aio.Channel:
        """Channel ``index % size`` itself (for raw calls without a stub)."""
        return self._channels[index % len(self._channels)]

    async def ready(self, seconds: float) -> None:
        """Waits until every channel is connected, so set-up is not measured."""
        async with asyncio.timeout(seconds):
            await asyncio.gather(*(ch.channel_ready() for ch in self._channels))

    async def close(self) -> None:
        await asyncio.gather(*(ch.close(grace=None) for ch in self._channels))
