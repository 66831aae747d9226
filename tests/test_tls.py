"""TLS and mutual TLS on the gRPC port, with certificates generated per test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.grpc import tls
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support_reliability import Authority, secure_channel

TIMEOUT = 5.0


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA with a server and a client certificate, and a stranger CA with its own client."""
    ca = Authority(tmp_path / "ca", "test-ca")
    stranger = Authority(tmp_path / "stranger", "stranger-ca")
    server_cert, server_key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    rogue_cert, rogue_key = stranger.issue("rogue", server=False)
    return {
        "ca": ca.cert_file,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "stranger_ca": stranger.cert_file,
        "rogue_cert": rogue_cert,
        "rogue_key": rogue_key,
    }


async def create_ok(channel: grpc.aio.Channel, event_id: int = 1) -> None:
    stub = pb_grpc.ActivityEventsStub(channel)
    response = await stub.CreateEvent(
        pb.EventRequest(id=event_id, deployment_id=3, message="over tls"), timeout=TIMEOUT
    )
    assert response.success


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    stub = pb_grpc.ActivityEventsStub(channel)
    try:
        await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return error.code()
    raise AssertionError("the call went through")


async def test_tls_serves_clients_that_trust_the_ca(app_factory: Any, pki: dict[str, Path]) -> None:
    app = await app_factory(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"])
    channel = secure_channel(app.port, pki["ca"])
    try:
        await create_ok(channel)
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        # No client certificate is needed without a client CA.
    finally:
        await channel.close(None)


async def test_tls_port_refuses_plaintext_and_untrusting_clients(
    app_factory: Any, pki: dict[str, Path]
) -> None:
    app = await app_factory(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"])
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    wrong_ca = secure_channel(app.port, pki["stranger_ca"])
    try:
        assert await refused(plain) == grpc.StatusCode.UNAVAILABLE
        assert await refused(wrong_ca) == grpc.StatusCode.UNAVAILABLE
    finally:
        await plain.close(None)
        await wrong_ca.close(None)


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    app_factory: Any, pki: dict[str, Path]
) -> None:
    app = await app_factory(
        tls_cert_file=pki["server_cert"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["ca"],
    )
    good = secure_channel(app.port, pki["ca"], pki["client_cert"], pki["client_key"])
    anonymous = secure_channel(app.port, pki["ca"])
    rogue = secure_channel(app.port, pki["ca"], pki["rogue_cert"], pki["rogue_key"])
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        await create_ok(good)
        assert await refused(anonymous) == grpc.StatusCode.UNAVAILABLE
        assert await refused(rogue) == grpc.StatusCode.UNAVAILABLE
        assert await refused(plain) == grpc.StatusCode.UNAVAILABLE
        await create_ok(good, event_id=2)  # refused handshakes leave the server serving
    finally:
        for channel in (good, anonymous, rogue, plain):
            await channel.close(None)


def test_plaintext_is_the_default(settings_factory: Any) -> None:
    assert tls.server_credentials(settings_factory()) is None


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"tls_cert_file": "server_cert"}, "must be set together"),
        ({"tls_key_file": "server_key"}, "must be set together"),
        ({"tls_client_ca_file": "ca"}, "needs ACTIVITY_TLS_CERT_FILE"),
        ({"tls_cert_file": "missing", "tls_key_file": "server_key"}, "cannot read TLS certificate"),
        ({"tls_cert_file": "server_cert", "tls_key_file": "empty"}, "is empty"),
    ],
)
def test_incomplete_tls_settings_are_clear_errors(
    settings_factory: Any, pki: dict[str, Path], tmp_path: Path, overrides: dict[str, str],
    problem: str,
) -> None:  # fmt: skip
    (tmp_path / "empty").write_text("")
    files = {**pki, "missing": tmp_path / "nope.pem", "empty": tmp_path / "empty"}
    settings = settings_factory(**{key: files[name] for key, name in overrides.items()})
    with pytest.raises(tls.TlsConfigError, match=problem) as raised:
        tls.server_credentials(settings)
    assert "PRIVATE KEY" not in str(raised.value)


async def test_start_fails_rather_than_serving_plaintext(
    app_factory: Any, pki: dict[str, Path]
) -> None:
    with pytest.raises(tls.TlsConfigError):
        await app_factory(tls_cert_file=pki["server_cert"])


async def test_garbage_on_the_tls_port_leaves_it_serving(
    app_factory: Any, pki: dict[str, Path]
) -> None:
    """Plaintext HTTP/2, noise and a cut ClientHello on the TLS port: refused, port still works."""
    from tests.test_garbage import GARBAGE, send_raw  # noqa: PLC0415

    app = await app_factory(
        tls_cert_file=pki["server_cert"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["ca"],
    )
    for data in GARBAGE.values():
        await send_raw(app.port, data, linger=0.05)
    channel = secure_channel(app.port, pki["ca"], pki["client_cert"], pki["client_key"])
    try:
        await create_ok(channel)
    finally:
        await channel.close(None)
