"""Redis AUTH (password, ACL user) and TLS to Redis, against real redis-server processes.

Credentials are switched on at run time (CONFIG SET / ACL SETUSER) on a
private Redis, so the shared RedisProcess helper can still check readiness with
a bare PING. TLS Redis listens on a TLS port next to its plaintext one, with
certificates generated in the test. Wrong credentials must leave the service
running, NOT_SERVING, with a clear log line and no traceback storm.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.ports import free_port
from tests.support.redis_process import DEFAULT_OPTIONS, RedisProcess
from tests.support_reliability import Authority, event

PASSWORD = "s3cret-Redis-Pass-42"
USER = "activity"
USER_PASSWORD = "acl-Pass-for-activity-77"
TIMEOUT = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def admin(redis: RedisProcess, *command: str, password: str | None = None) -> Any:
    client = redis_asyncio.Redis(port=redis.port, password=password, socket_timeout=5)
    try:
        return await client.execute_command(*command)
    finally:
        await client.aclose()


@pytest.fixture
async def password_redis(redis_server: RedisProcess) -> RedisProcess:
    await admin(redis_server, "CONFIG", "SET", "requirepass", PASSWORD)
    return redis_server


@pytest.fixture
async def acl_redis(redis_server: RedisProcess) -> RedisProcess:
    """Anonymous access off; one user limited to the service's keys and non-admin commands."""
    await admin(
        redis_server,
        "ACL",
        "SETUSER",
        USER,
        "on",
        f">{USER_PASSWORD}",
        "~ae:*",
        "&*",
        "+@all",
        "-@admin",
        "-@dangerous",
        "+info",
    )
    await admin(redis_server, "ACL", "SETUSER", "default", "off")
    return redis_server


async def health_of(app: Any, channel_factory: Callable[..., grpc.aio.Channel]) -> int:
    health = health_pb2_grpc.HealthStub(channel_factory(app.port))
    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    return int(response.status)


async def works(app: Any, channel_factory: Callable[..., grpc.aio.Channel]) -> None:
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    assert (await stub.CreateEvent(event(1, 1), timeout=TIMEOUT)).success
    listed = [e async for e in stub.ListEvents(pb.Deployment(id=1), timeout=TIMEOUT)]
    assert [e.id for e in listed] == [1]
    assert await health_of(app, channel_factory) == SERVING


async def refused(
    app: Any, channel_factory: Callable[..., grpc.aio.Channel], secret: str
) -> grpc.aio.AioRpcError:
    """The service runs, says NOT_SERVING, and RPCs fail UNAVAILABLE without the secret."""
    assert await health_of(app, channel_factory) == NOT_SERVING
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateEvent(event(1, 1), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert secret not in (raised.value.details() or "")
    return raised.value


async def test_password_from_setting(
    password_redis: RedisProcess, app_factory: Any, channel_factory: Any
) -> None:
    app = await app_factory(redis_password=PASSWORD)
    await works(app, channel_factory)


async def test_password_in_url(
    password_redis: RedisProcess, app_factory: Any, channel_factory: Any
) -> None:
    app = await app_factory(redis_url=f"redis://:{PASSWORD}@127.0.0.1:{password_redis.port}/0")
    await works(app, channel_factory)


async def test_acl_user(acl_redis: RedisProcess, app_factory: Any, channel_factory: Any) -> None:
    app = await app_factory(redis_username=USER, redis_password=USER_PASSWORD)
    await works(app, channel_factory)
    # The follower hub works under the ACL user too.
    stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))
    call = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=1, follow=True), timeout=TIMEOUT)
    try:
        first = await asyncio.wait_for(call.read(), TIMEOUT)
        assert [e.event.id for e in first.events] == [1]
        assert (await asyncio.wait_for(call.read(), TIMEOUT)).caught_up
        await stub.CreateEvent(event(1, 2), timeout=TIMEOUT)
        live = await asyncio.wait_for(call.read(), TIMEOUT)
        assert [e.event.id for e in live.events] == [2]
    finally:
        call.cancel()


async def test_acl_user_in_url(
    acl_redis: RedisProcess, app_factory: Any, channel_factory: Any
) -> None:
    url = f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    app = await app_factory(redis_url=url)
    await works(app, channel_factory)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="no password"),
        pytest.param({"redis_password": "wrong-password-123"}, id="wrong password"),
    ],
)
async def test_wrong_password_is_not_serving_with_a_clear_log(
    password_redis: RedisProcess,
    app_factory: Any,
    channel_factory: Any,
    caplog: pytest.LogCaptureFixture,
    overrides: dict[str, str],
) -> None:
    caplog.set_level(logging.INFO)
    app = await app_factory(**overrides)
    await asyncio.sleep(1.5)  # a few health probes
    error = await refused(app, channel_factory, PASSWORD)
    assert (
        "credential" in (error.details() or "").lower() or "auth" in (error.details() or "").lower()
    ), error.details()
    records = [r for r in caplog.records if r.name.startswith("activity_events")]
    text = "\n".join(r.getMessage() for r in records)
    assert any(
        "credential" in r.getMessage().lower() or "auth" in r.getMessage().lower() for r in records
    ), text
    assert not any(r.exc_info for r in records), "tracebacks logged for a credentials problem"
    assert PASSWORD not in caplog.text and "wrong-password-123" not in caplog.text


async def test_wrong_acl_user_is_not_serving(
    acl_redis: RedisProcess, app_factory: Any, channel_factory: Any
) -> None:
    app = await app_factory(redis_username=USER, redis_password="not-the-acl-password")
    await refused(app, channel_factory, "not-the-acl-password")
    app2 = await app_factory()  # anonymous: the default user is off
    await refused(app2, channel_factory, USER_PASSWORD)


async def test_wrong_credentials_in_the_real_process_log_no_traceback_storm(
    password_redis: RedisProcess, server_process_factory: Any
) -> None:
    """The console script with a wrong password: up, NOT_SERVING, one clear line, no tracebacks."""
    process = server_process_factory(
        {"ACTIVITY_REDIS_URL": password_redis.url, "ACTIVITY_REDIS_PASSWORD": "wrong-password-123"}
    )
    await asyncio.to_thread(process.start, wait=False)
    await asyncio.to_thread(process.wait_for_output, r"Server has been started on", 20)
    await asyncio.to_thread(process.wait_health, NOT_SERVING, 10)
    await asyncio.sleep(4.0)  # several probe rounds
    assert process.returncode is None, process.output[-3000:]
    output = process.output
    assert "Traceback" not in output, output[-3000:]
    assert "wrong-password-123" not in output
    lines = output.splitlines()
    assert len(lines) < 40, f"{len(lines)} log lines in ~5 s:\n{output[-3000:]}"
    assert any("credential" in line.lower() or "auth" in line.lower() for line in lines), output


# -- TLS to Redis ------------------------------------------------------------------------


@pytest.fixture
def redis_pki(tmp_path: Path) -> dict[str, Path]:
    ca = Authority(tmp_path / "redis-ca", "redis-ca")
    stranger = Authority(tmp_path / "other-ca", "other-ca")
    server_cert, server_key = ca.issue("redis", server=True)
    client_cert, client_key = ca.issue("activity", server=False)
    return {
        "ca": ca.cert_file,
        "other_ca": stranger.cert_file,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }


def tls_redis(
    redis_factory: Callable[..., RedisProcess], pki: dict[str, Path], *, client_auth: bool
) -> tuple[RedisProcess, int]:
    """A Redis with a TLS port (returned) beside the plaintext port its helper pings."""
    tls_port = free_port()
    options = (
        *DEFAULT_OPTIONS,
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(pki["server_cert"]),
        "--tls-key-file",
        str(pki["server_key"]),
        "--tls-ca-cert-file",
        str(pki["ca"]),
        "--tls-auth-clients",
        "yes" if client_auth else "no",
    )
    return redis_factory(options=options), tls_port


async def test_rediss_with_ca(
    redis_factory: Callable[..., RedisProcess],
    redis_pki: dict[str, Path],
    app_factory: Any,
    channel_factory: Any,
) -> None:
    _, tls_port = tls_redis(redis_factory, redis_pki, client_auth=False)
    app = await app_factory(
        redis_url=f"rediss://127.0.0.1:{tls_port}/0", redis_tls_ca_file=redis_pki["ca"]
    )
    await works(app, channel_factory)


async def test_rediss_with_client_certificate(
    redis_factory: Callable[..., RedisProcess],
    redis_pki: dict[str, Path],
    app_factory: Any,
    channel_factory: Any,
) -> None:
    _, tls_port = tls_redis(redis_factory, redis_pki, client_auth=True)
    url = f"rediss://127.0.0.1:{tls_port}/0"
    app = await app_factory(
        redis_url=url,
        redis_tls_ca_file=redis_pki["ca"],
        redis_tls_cert_file=redis_pki["client_cert"],
        redis_tls_key_file=redis_pki["client_key"],
    )
    await works(app, channel_factory)
    # Without the client certificate Redis refuses the handshake.
    anonymous = await app_factory(redis_url=url, redis_tls_ca_file=redis_pki["ca"])
    await refused(anonymous, channel_factory, "BEGIN")


async def test_rediss_refuses_a_server_signed_by_another_ca(
    redis_factory: Callable[..., RedisProcess],
    redis_pki: dict[str, Path],
    app_factory: Any,
    channel_factory: Any,
) -> None:
    _, tls_port = tls_redis(redis_factory, redis_pki, client_auth=False)
    app = await app_factory(
        redis_url=f"rediss://127.0.0.1:{tls_port}/0", redis_tls_ca_file=redis_pki["other_ca"]
    )
    await refused(app, channel_factory, "BEGIN")
