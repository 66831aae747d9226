"""The test helpers themselves: a broken fixture would make every other test meaningless."""

from __future__ import annotations

import redis.asyncio as redis_asyncio

from tests.support.ports import free_port, port_is_open
from tests.support.redis_process import RedisProcess, ping


def test_free_port_is_bindable_and_not_the_machine_redis() -> None:
    port = free_port()
    assert port != 6379
    assert not port_is_open(port)


async def test_redis_process_restarts_on_same_port_with_data(redis_server: RedisProcess) -> None:
    port, first_pid = redis_server.port, redis_server.pid
    assert first_pid is not None and ping(port)
    async with redis_asyncio.Redis.from_url(redis_server.url, socket_timeout=5) as client:
        await client.set("k", "v")
    redis_server.stop()
    assert redis_server.pid is None
    assert not ping(port)
    redis_server.start()
    assert redis_server.port == port
    assert redis_server.pid not in (None, first_pid)
    async with redis_asyncio.Redis.from_url(redis_server.url, socket_timeout=5) as client:
        assert await client.get("k") == b"v"
    redis_server.kill()
    assert not ping(port)
    redis_server.start()
    assert ping(port)


def test_settings_factory_points_at_private_redis(settings_factory, redis_server) -> None:  # type: ignore[no-untyped-def]
    settings = settings_factory(page_size=7)
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == redis_server.url
    assert settings.port == 0 and settings.metrics_port == 0
    assert settings.page_size == 7
