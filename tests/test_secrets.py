"""No secret reaches logs, error messages or metrics: planted secrets are searched for.

The real console script runs at DEBUG with a Redis password in its URL,
bearer tokens and a TLS private key; clients send good, unknown and
wrong-role tokens. Then everything the outside world can read (stdout/stderr
logs, every status message, the /metrics page) is searched for the secrets.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis as redis_sync

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.redis_process import RedisProcess
from tests.support_reliability import Authority, event, secure_channel

REDIS_PASSWORD = "PlantedRedisPw-7f3a9c"
WRITER_TOKEN = "PlantedWriterToken-1b2c3d4e5f"
READER_TOKEN = "PlantedReaderToken-9e8d7c6b5a"
UNKNOWN_TOKEN = "PlantedUnknownToken-0a0b0c0d"
WRONG_PASSWORD = "PlantedWrongRedisPw-4d4d"
TIMEOUT = 5.0
METRICS_LINE = re.compile(r"served on (http://[\d.:]+)")


def require_password(redis: RedisProcess) -> None:
    client = redis_sync.Redis(port=redis.port, socket_timeout=5)
    try:
        client.config_set("requirepass", REDIS_PASSWORD)
    finally:
        client.close()


async def call_status(awaitable: Any) -> tuple[str, str]:
    try:
        await awaitable
    except grpc.aio.AioRpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


def secret_lines(key_file: Path) -> list[str]:
    """Lines of the private key's PEM body: none may appear anywhere."""
    return [line for line in key_file.read_text().splitlines() if line and "-----" not in line]


async def test_no_secret_in_logs_errors_or_metrics(
    redis_server: RedisProcess,
    server_process_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    require_password(redis_server)
    ca = Authority(tmp_path / "ca")
    cert, key = ca.issue("server", server=True)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"writer {WRITER_TOKEN} pipeline\nreader {READER_TOKEN} dashboard\n")
    process = server_process_factory(
        {
            "ACTIVITY_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/0",
            "ACTIVITY_AUTH_TOKENS_FILE": str(tokens),
            "ACTIVITY_TLS_CERT_FILE": str(cert),
            "ACTIVITY_TLS_KEY_FILE": str(key),
            "ACTIVITY_LOG_LEVEL": "DEBUG",
        }
    )
    await asyncio.to_thread(process.start, wait=False)
    await asyncio.to_thread(process.wait_for_output, r"Server has been started on", 20)

    details: list[str] = []
    channel = secure_channel(process.port, ca.cert_file)
    try:
        stub = pb_grpc.ActivityEventsStub(channel)
        for _ in range(50):  # health over TLS: wait for SERVING via a real call
            code, _ = await call_status(
                stub.CreateEvent(
                    event(1, 1),
                    metadata=(("authorization", f"Bearer {WRITER_TOKEN}"),),
                    timeout=TIMEOUT,
                )
            )
            if code == "OK":
                break
            await asyncio.sleep(0.2)
        assert code == "OK", process.output[-3000:]
        attempts = [
            stub.CreateEvent(event(1, 2), timeout=TIMEOUT),
            stub.CreateEvent(
                event(1, 3),
                metadata=(("authorization", f"Bearer {UNKNOWN_TOKEN}"),),
                timeout=TIMEOUT,
            ),
            stub.CreateEvent(
                event(1, 4),
                metadata=(("authorization", f"Bearer {READER_TOKEN}"),),
                timeout=TIMEOUT,
            ),
            stub.DeleteDeployment(
                pb.DeleteDeploymentRequest(deployment_id=1),
                metadata=(("authorization", f"Bearer {WRITER_TOKEN}"),),
                timeout=TIMEOUT,
            ),
            stub.CreateEvent(
                event(1, 1, "different"),
                metadata=(("authorization", f"Bearer {WRITER_TOKEN}"),),
                timeout=TIMEOUT,
            ),
            stub.CreateEvent(
                event(-1, 1),
                metadata=(("authorization", f"Bearer {WRITER_TOKEN}"),),
                timeout=TIMEOUT,
            ),
            stub.ListDeployments(
                pb.ListDeploymentsRequest(page_token=UNKNOWN_TOKEN),
                metadata=(("authorization", f"Bearer {READER_TOKEN}"),),
                timeout=TIMEOUT,
            ),
        ]
        for attempt in attempts:
            code, detail = await call_status(attempt)
            details.append(f"{code}: {detail}")
        codes = [d.split(":")[0] for d in details]
        assert codes == [
            "UNAUTHENTICATED",
            "UNAUTHENTICATED",
            "PERMISSION_DENIED",
            "PERMISSION_DENIED",
            "ALREADY_EXISTS",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ], details
    finally:
        await channel.close(None)

    match = METRICS_LINE.search(process.output)
    assert match, process.output[-2000:]
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"{match.group(1)}/metrics", timeout=5).read().decode()  # noqa: S310
    )
    assert "grpc_server_handled_total" in metrics
    await asyncio.to_thread(process.stop)

    secrets = [REDIS_PASSWORD, WRITER_TOKEN, READER_TOKEN, UNKNOWN_TOKEN, *secret_lines(key)]
    places = {"logs": process.output, "status details": "\n".join(details), "metrics": metrics}
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a planted secret ({secret[:12]}...) appears in {where}"
    # The search is not vacuous: logs and metrics did record the refused calls.
    assert "CreateEvent" in process.output
    assert 'grpc_code="PermissionDenied"' in metrics and 'grpc_code="Unauthenticated"' in metrics


async def test_wrong_redis_password_is_never_printed(
    redis_server: RedisProcess, server_process_factory: Callable[..., Any]
) -> None:
    require_password(redis_server)
    process = server_process_factory(
        {
            "ACTIVITY_REDIS_URL": f"redis://:{WRONG_PASSWORD}@127.0.0.1:{redis_server.port}/0",
            "ACTIVITY_LOG_LEVEL": "DEBUG",
        }
    )
    await asyncio.to_thread(process.start, wait=False)
    await asyncio.to_thread(process.wait_for_output, r"Server has been started on", 20)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{process.port}") as channel:
        stub = pb_grpc.ActivityEventsStub(channel)
        code, detail = await call_status(stub.CreateEvent(event(1, 1), timeout=TIMEOUT))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(process.stop)
    assert code == "UNAVAILABLE", detail
    assert WRONG_PASSWORD not in detail
    assert WRONG_PASSWORD not in process.output
    assert "***" in process.output or "127.0.0.1" in process.output


def test_settings_repr_hides_passwords(settings_factory: Callable[..., Any]) -> None:
    settings = settings_factory(
        redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0", redis_password=REDIS_PASSWORD
    )
    assert REDIS_PASSWORD not in repr(settings)
    assert REDIS_PASSWORD not in str(settings.model_dump())


@pytest.mark.parametrize("bad", ["missing", "invalid"])
def test_token_file_errors_never_quote_tokens(tmp_path: Path, bad: str) -> None:
    from activity_events.grpc import auth  # noqa: PLC0415

    path = tmp_path / "tokens"
    if bad == "invalid":
        path.write_text(f"root {WRITER_TOKEN}\n")
    with pytest.raises(auth.TokenFileError) as raised:
        auth.TokenTable(path)
    assert WRITER_TOKEN not in str(raised.value)
