"""Lifecycle: health, Redis outages, restarts, signals, reflection, the embedded Redis.

Signal handling, exit codes and start-up logs only exist in the real
process, so those tests run ``activity-server`` as a child; outage tests use
an in-process server so its state can be watched closely.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import redis.asyncio as redis_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.ports import free_port
from tests.support.redis_process import RedisProcess
from tests.support.server_process import ServerProcess
from tests.support.streams import (
    RPC_TIMEOUT,
    Follower,
    create,
    event,
    list_events,
    status_of,
    stream_status,
    wait_until,
)

SERVICE = "activityevents.ActivityEvents"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

ServerFactory = Callable[..., ServerProcess]


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2
    )
    return int(response.status)


async def both_health(channel: grpc.aio.Channel) -> set[int]:
    return {await health(channel, ""), await health(channel, SERVICE)}


class HealthWatch:
    """Collects every status a health Watch stream reports, in the background."""

    def __init__(self, channel: grpc.aio.Channel, service: str = "") -> None:
        self.call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service)
        )
        self.statuses: list[int] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        try:
            async for response in self.call:
                self.statuses.append(int(response.status))
        except grpc.aio.AioRpcError as error:
            self.error = error

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 5)


async def test_health_serving_for_both_names(channel: grpc.aio.Channel) -> None:
    assert await both_health(channel) == {SERVING}
    error = await status_of(health(channel, "no.such.Service"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
async def test_redis_outage_and_recovery_without_restart(
    app_factory: Any,
    channel_factory: Callable[..., grpc.aio.Channel],
    redis_server: RedisProcess,
) -> None:
    app = await app_factory(redis_timeout_seconds=1.0)
    channel = channel_factory(app.port)
    stub = pb_grpc.ActivityEventsStub(channel)
    before = await create(stub, 1, 1, "before the outage")
    watcher = HealthWatch(channel, SERVICE)
    try:
        await wait_until(lambda: watcher.statuses[-1:] == [SERVING], 2, message="watch SERVING")
        redis_server.kill()
        for call in (
            lambda: stub.CreateEvent(event(1, 2, "during"), timeout=RPC_TIMEOUT),
            lambda: stub.CreateEvents(
                pb.CreateEventsRequest(events=[event(1, 3)]), timeout=RPC_TIMEOUT
            ),
            lambda: stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=RPC_TIMEOUT),
        ):
            started = time.monotonic()
            error = await status_of(call())
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 1.0 + 1.0
        for request in (pb.Deployment(id=1), pb.Deployment(id=0)):
            started = time.monotonic()
            error = await stream_status(stub.ListEvents(request, timeout=RPC_TIMEOUT))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 2.0
        started = time.monotonic()
        error = await stream_status(
            stub.WatchEvents(pb.WatchEventsRequest(deployment_id=1), timeout=RPC_TIMEOUT)
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2.0

        async def not_serving() -> bool:
            return await both_health(channel) == {NOT_SERVING}

        await wait_until(not_serving, 3, message="health NOT_SERVING")
        redis_server.start()

        async def serving() -> bool:
            return await both_health(channel) == {SERVING}

        await wait_until(serving, 10, interval=0.1, message="health SERVING after recovery")
        after = await create(stub, 1, 2, "after the outage")
        assert after.success and not after.duplicate
        assert [e.message for e in await list_events(stub, 1)] == [
            "before the outage",
            "after the outage",
        ]
        assert (await create(stub, 1, 1, "before the outage")).cursor == before.cursor
        await wait_until(
            lambda: watcher.statuses[-1:] == [SERVING], 2, message="watch back to SERVING"
        )
        assert NOT_SERVING in watcher.statuses
        first_down = watcher.statuses.index(NOT_SERVING)
        assert SERVING in watcher.statuses[:first_down]
    finally:
        await watcher.close()


@pytest.mark.slow
async def test_hung_redis_fails_calls_within_the_timeout(
    app_factory: Any,
    channel_factory: Callable[..., grpc.aio.Channel],
    redis_server: RedisProcess,
) -> None:
    """A Redis that accepts nothing but does not close sockets: calls must not hang."""
    app = await app_factory(redis_timeout_seconds=1.0)
    channel = channel_factory(app.port)
    stub = pb_grpc.ActivityEventsStub(channel)
    await create(stub, 1, 1)
    redis_server.pause()
    try:
        started = time.monotonic()
        error = await status_of(create(stub, 1, 2))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 1.0 + 1.0
        started = time.monotonic()
        error = await stream_status(
            stub.ListEvents(pb.Deployment(id=1), timeout=RPC_TIMEOUT), timeout=RPC_TIMEOUT
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 1.0 + 1.0

        async def not_serving() -> bool:
            return await health(channel) == NOT_SERVING

        await wait_until(not_serving, 4, message="health NOT_SERVING while Redis hangs")
    finally:
        redis_server.resume()

    async def serving() -> bool:
        return await health(channel) == SERVING

    await wait_until(serving, 10, interval=0.1, message="health SERVING after resume")
    assert (await create(stub, 1, 3)).success


async def _grpcurl(*args: str) -> tuple[int, str]:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    process = await asyncio.create_subprocess_exec(
        binary,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return int(process.returncode or 0), out.decode(errors="replace")


@pytest.mark.slow
async def test_reflection_with_grpcurl(app_factory: Any) -> None:
    app = await app_factory()
    address = f"127.0.0.1:{app.port}"
    code, out = await _grpcurl("-plaintext", address, "list")
    assert code == 0, out
    assert SERVICE in out.split()
    assert "grpc.health.v1.Health" in out.split()
    code, out = await _grpcurl("-plaintext", address, "describe", SERVICE)
    assert code == 0, out
    for rpc in ("CreateEvent", "ListEvents", "WatchEvents", "CreateEvents", "ListDeployments"):
        assert f"rpc {rpc}" in out
    code, out = await _grpcurl(
        "-plaintext",
        "-d",
        '{"id": 5, "deployment_id": 3, "message": "from grpcurl"}',
        address,
        f"{SERVICE}/CreateEvent",
    )
    assert code == 0, out
    assert '"success": true' in out


@pytest.mark.slow
async def test_reflection_can_be_turned_off(app_factory: Any) -> None:
    app = await app_factory(reflection=False)
    code, out = await _grpcurl("-plaintext", f"127.0.0.1:{app.port}", "list")
    assert code != 0, out


def _aio_channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.mark.slow
async def test_persistence_across_server_restart(
    server_process_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    env = {"ACTIVITY_REDIS_URL": redis_server.url, "ACTIVITY_GRACE_SECONDS": "3"}
    first = server_process_factory(env)
    await asyncio.to_thread(first.start)
    assert f"Server has been started on {first.port}" in first.output
    async with _aio_channel(first.port) as channel:
        stub = pb_grpc.ActivityEventsStub(channel)
        created = [await create(stub, 4, i, f"kept {i}") for i in range(1, 4)]
        listed_before = await list_events(stub, 4)
    first.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait, 10) == 0

    second = server_process_factory(env)
    await asyncio.to_thread(second.start)
    async with _aio_channel(second.port) as channel:
        stub = pb_grpc.ActivityEventsStub(channel)
        assert await list_events(stub, 4) == listed_before
        again = await create(stub, 4, 2, "kept 2")
        assert again.duplicate and again.cursor == created[1].cursor
        assert (await create(stub, 4, 0)).id == 4


@pytest.mark.slow
async def test_sigterm_drains_in_flight_calls_and_exits_zero(
    server_process_factory: ServerFactory,
    redis_server: RedisProcess,
    redis_client: redis_asyncio.Redis,
) -> None:
    grace = 3.0
    proc = server_process_factory(
        {
            "ACTIVITY_REDIS_URL": redis_server.url,
            "ACTIVITY_GRACE_SECONDS": str(grace),
            "ACTIVITY_REDIS_TIMEOUT_SECONDS": "5",
        }
    )
    await asyncio.to_thread(proc.start)
    async with _aio_channel(proc.port) as channel:
        stub = pb_grpc.ActivityEventsStub(channel)
        watcher = HealthWatch(channel)
        follower = Follower(stub, 1)
        await follower.until_caught_up()
        await wait_until(lambda: watcher.statuses[-1:] == [SERVING], 3, message="SERVING")
        successes: list[tuple[int, int]] = []
        failures: list[grpc.StatusCode] = []
        stop_looping = asyncio.Event()

        async def looper(deployment_id: int) -> None:
            for i in range(1, 100_000):
                if stop_looping.is_set():
                    return
                try:
                    response = await create(stub, deployment_id, i)
                except grpc.aio.AioRpcError as error:
                    failures.append(error.code())
                    return
                assert response.success and not response.duplicate
                successes.append((deployment_id, i))

        loopers = [asyncio.create_task(looper(d)) for d in (1, 2, 3, 4)]
        await wait_until(lambda: len(successes) >= 40, 10, message="loopers running")
        big = [event(9, i, "x" * 1000) for i in range(1, 1001)]

        async def big_batch() -> pb.CreateEventsResponse:
            response: pb.CreateEventsResponse = await stub.CreateEvents(
                pb.CreateEventsRequest(events=big), timeout=RPC_TIMEOUT
            )
            return response

        # Hold every call inside its handler: with Redis paused they wait on it, so
        # they are certainly in flight when the signal arrives.
        redis_server.pause()
        try:
            batch = asyncio.create_task(big_batch())
            await asyncio.sleep(0.5)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
        finally:
            redis_server.resume()
        try:
            code = await asyncio.to_thread(proc.wait, grace + 5)
        finally:
            stop_looping.set()
        assert code == 0, proc.output[-3000:]
        assert time.monotonic() - signalled < grace + 3, proc.output[-3000:]
        # The batch in flight when the signal came completed in full.
        response = await batch
        assert [r.outcome for r in response.results] == [pb.OUTCOME_CREATED] * 1000
        await asyncio.wait_for(asyncio.gather(*loopers), 10)
        # Calls that failed were refused: UNAVAILABLE once the port is closed, or
        # CANCELLED when grpc core drops calls that no handler had accepted yet at
        # shutdown (grpc/grpc#41785). Neither may have written anything, which the
        # counts below check: a call a handler accepted must have completed.
        assert set(failures) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        # Every success the clients were told about is stored, and nothing else.
        for deployment_id in (1, 2, 3, 4):
            told = sum(1 for d, _ in successes if d == deployment_id)
            assert await redis_client.xlen(f"ae:{{d:{deployment_id}}}:events") == told
        assert await redis_client.xlen("ae:{d:9}:events") == 1000
        # The follower saw its live events and then a clean end of stream.
        read_error: grpc.aio.AioRpcError | None = None
        try:
            for _ in range(100_000):
                if await follower.read_one(5) is None:
                    break
        except grpc.aio.AioRpcError as error:
            read_error = error
        assert read_error is None, f"follower ended with {read_error}"
        assert follower.ended
        # Followers are ended before unary calls drain, so the follower holds a
        # gap-free prefix of deployment 1's events; a client resumes from there.
        followed = [s.event.id for s in follower.events]
        assert followed == list(range(1, len(followed) + 1))
        assert len(followed) <= sum(1 for d, _ in successes if d == 1)
        await asyncio.wait_for(watcher.task, 5)
        assert NOT_SERVING in watcher.statuses, watcher.statuses
        assert watcher.statuses.index(NOT_SERVING) > watcher.statuses.index(SERVING)


@pytest.mark.slow
async def test_python_module_with_legacy_port_exits_zero_on_sigint(
    server_process_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    port = free_port()
    proc = server_process_factory(
        {"ACTIVITY_REDIS_URL": redis_server.url, "PORT": str(port)},
        port=port,
        command=[sys.executable, "-m", "activity_events.app.server"],
    )
    del proc.env["ACTIVITY_PORT"]  # only the original service's variable names the port
    await asyncio.to_thread(proc.start)
    assert f"Server has been started on {port}" in proc.output
    async with _aio_channel(port) as channel:
        assert (await create(pb_grpc.ActivityEventsStub(channel), 1, 1)).success
    proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(proc.wait, 10) == 0
    assert "Traceback" not in proc.output


@pytest.mark.slow
async def test_embedded_redis_serves_and_persists(
    server_process_factory: ServerFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "embedded-data"
    env = {"ACTIVITY_DATA_DIR": str(data_dir), "ACTIVITY_GRACE_SECONDS": "3"}
    children: list[psutil.Process] = []
    servers: list[ServerProcess] = []
    try:
        first = server_process_factory(env)
        servers.append(first)
        await asyncio.to_thread(first.start, timeout=30)
        assert "embedded" in first.output.lower()
        assert first.pid is not None
        children = psutil.Process(first.pid).children(recursive=True)
        assert children, "the embedded redis-server should be a child process"
        [socket_path] = {
            c.laddr for c in children[0].net_connections(kind="unix") if c.laddr.endswith(".sock")
        }
        embedded = redis_asyncio.Redis(unix_socket_path=socket_path, socket_timeout=5)
        try:  # the recommended settings (docs/operations.md, "Redis settings")
            config = await embedded.config_get("stream-node-max-*")
        finally:
            await embedded.aclose()
        assert config == {"stream-node-max-bytes": "16384", "stream-node-max-entries": "1000"}
        async with _aio_channel(first.port) as channel:
            stub = pb_grpc.ActivityEventsStub(channel)
            created = await create(stub, 6, 1, "kept by the embedded redis")
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 15) == 0
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 5)
        assert alive == [], f"embedded redis left running: {alive}"
        assert data_dir.exists()

        second = server_process_factory(env)
        servers.append(second)
        await asyncio.to_thread(second.start, timeout=30)
        assert second.pid is not None
        children = psutil.Process(second.pid).children(recursive=True)
        async with _aio_channel(second.port) as channel:
            stub = pb_grpc.ActivityEventsStub(channel)
            [stored] = await list_events(stub, 6)
            assert stored.message == "kept by the embedded redis"
            assert (await create(stub, 6, 1, "kept by the embedded redis")).cursor == (
                created.cursor
            )
    finally:
        for server in servers:
            await asyncio.to_thread(server.stop)
        # Children of our own server processes, stopped by PID if a server left them.
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.is_running():
                    child.kill()


@pytest.mark.slow
async def test_follower_across_redis_restart_has_no_gap(
    app_factory: Any,
    channel_factory: Callable[..., grpc.aio.Channel],
    redis_server: RedisProcess,
) -> None:
    """A follower open while Redis restarts either keeps going without a gap or ends
    with UNAVAILABLE naming its last cursor; it never hangs or skips events."""
    app = await app_factory(redis_timeout_seconds=1.0)
    channel = channel_factory(app.port)
    stub = pb_grpc.ActivityEventsStub(channel)
    follower = Follower(stub, 1)
    try:
        await follower.until_caught_up()
        for i in (1, 2, 3):
            await create(stub, 1, i)
        await follower.until_count(3, 5)
        redis_server.kill()
        await asyncio.sleep(0.5)
        redis_server.start()

        async def serving() -> bool:
            return await health(channel) == SERVING

        await wait_until(serving, 10, interval=0.1, message="SERVING after Redis restart")
        for i in (4, 5, 6):
            await create(stub, 1, i)
        try:
            await follower.until_count(6, 10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert f"last cursor {follower.events[-1].cursor}" in (error.details() or "")
        ids = [s.event.id for s in follower.events]
        assert ids == list(range(1, len(ids) + 1))
    finally:
        follower.cancel()
