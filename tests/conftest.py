"""Shared fixtures: real Redis processes, real servers, clean settings.

Fixture API (all function-scoped; everything started is stopped in
``finally``):

- ``clean_env`` (autouse): removes ``ACTIVITY_*``, ``PORT``, ``OTEL_*`` and ``CONSUL_*``
  from the environment so Settings only see what a test passes.
- ``redis_server``: a started ``RedisProcess`` (private redis-server on a free
  port in a temp dir): ``.url``, ``.port``, ``.pid``, ``.stop()``, ``.kill()``,
  ``.start()`` (same port and dir again), ``.pause()``/``.resume()`` (SIGSTOP/SIGCONT).
- ``redis_factory(**kwargs)``: more RedisProcess instances (started), e.g.
  with other ``options``.
- ``redis_client``: ``redis.asyncio.Redis`` (bytes responses) on ``redis_server``,
  for checking what the server stored.
- ``settings_factory(**overrides) -> Settings`` pointed at ``redis_server``
  with port 0, metrics_port 0, loopback hosts, a temp data_dir, grace_seconds 2,
  hub_block_ms 200 and redis_timeout_seconds 5 (tests of timeouts set their own).
- ``app_factory(settings=None, **overrides) -> Application`` (async): a started
  Application; all of them are stopped at teardown.
- ``server``: a started Application with default test settings.
- ``channel_factory(port, **options) -> grpc.aio.Channel``: channels closed at teardown.
- ``channel`` / ``stub``: an aio channel and an ActivityEventsStub for ``server``.
- ``stub_for(app) -> ActivityEventsStub``: a stub on a fresh channel to another app.
- ``server_process_factory(env=None, **kwargs) -> ServerProcess`` (not started):
  ``activity-server`` subprocesses, stopped (SIGTERM, then SIGKILL) at teardown.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio
from prometheus_client import CollectorRegistry

from activity_events.app.lifecycle import Application
from activity_events.app.settings import Settings
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.redis_process import RedisProcess
from tests.support.server_process import SETTINGS_ENV_NAMES, SETTINGS_ENV_PREFIXES, ServerProcess

SettingsFactory = Callable[..., Settings]
AppFactory = Callable[..., Awaitable[Application]]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: drop anything that would leak into a test."""
    for name in list(os.environ):
        if name in SETTINGS_ENV_NAMES or name.upper().startswith(SETTINGS_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def redis_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RedisProcess]]:
    """Start extra private redis-servers; each is stopped by PID at teardown."""
    started: list[RedisProcess] = []

    def start(**kwargs: Any) -> RedisProcess:
        process = RedisProcess(tmp_path_factory.mktemp("redis"), **kwargs)
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisProcess]) -> RedisProcess:
    """A private redis-server for this test only."""
    return redis_factory()


@pytest.fixture
async def redis_client(redis_server: RedisProcess) -> AsyncIterator[redis_asyncio.Redis]:
    """Direct access to the test's Redis, to check what the server stored."""
    client = redis_asyncio.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def settings_factory(redis_server: RedisProcess, tmp_path: Path) -> SettingsFactory:
    """Settings for an in-process server on free ports, pointed at ``redis_server``."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_server.url,
            "port": 0,
            "host": "127.0.0.1",
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            "data_dir": tmp_path / "data",
            "grace_seconds": 2.0,
            "hub_block_ms": 200,
            # Loaded CI machines stall for over a second at times; the production
            # default (1 s) would turn that into spurious UNAVAILABLE. Tests about
            # Redis timeouts pass their own redis_timeout_seconds.
            "redis_timeout_seconds": 5.0,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
async def app_factory(settings_factory: SettingsFactory) -> AsyncIterator[AppFactory]:
    """Start Applications (given ``settings``, or test settings with ``overrides``).

    All are stopped at teardown, newest first.
    """
    started: list[Application] = []

    async def start(settings: Settings | None = None, **overrides: Any) -> Application:
        app = Application(settings or settings_factory(**overrides), registry=CollectorRegistry())
        started.append(app)
        await app.start()
        return app

    try:
        yield start
    finally:
        for app in reversed(started):
            await app.stop()


@pytest.fixture
async def server(app_factory: AppFactory) -> Application:
    """A started Application with the default test settings."""
    return await app_factory()


@pytest.fixture
async def channel_factory() -> AsyncIterator[Callable[..., grpc.aio.Channel]]:
    """aio channels to 127.0.0.1:port, closed at teardown."""
    channels: list[grpc.aio.Channel] = []

    def open_channel(port: int, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        opened = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        channels.append(opened)
        return opened

    try:
        yield open_channel
    finally:
        for opened in channels:
            await opened.close()


@pytest.fixture
def stub_for(
    channel_factory: Callable[..., grpc.aio.Channel],
) -> Callable[..., pb_grpc.ActivityEventsStub]:
    """An ActivityEventsStub on a fresh channel to ``app`` (anything with ``.port``)."""

    def build(app: Any, options: list[tuple[str, Any]] | None = None) -> pb_grpc.ActivityEventsStub:
        return pb_grpc.ActivityEventsStub(channel_factory(app.port, options))

    return build


@pytest.fixture
def channel(server: Any, channel_factory: Callable[..., grpc.aio.Channel]) -> grpc.aio.Channel:
    """An aio channel to ``server``."""
    return channel_factory(server.port)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.ActivityEventsStub:
    """The ActivityEvents client of ``server``."""
    return pb_grpc.ActivityEventsStub(channel)


@pytest.fixture
def server_process_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Build ``activity-server`` subprocesses (call ``.start()``); stopped by PID at teardown."""
    created: list[ServerProcess] = []

    def build(env: dict[str, str] | None = None, **kwargs: Any) -> ServerProcess:
        kwargs.setdefault("cwd", tmp_path)
        process = ServerProcess(env, **kwargs)
        created.append(process)
        return process

    try:
        yield build
    finally:
        for process in created:
            process.stop()
