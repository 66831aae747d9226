"""Bearer-token auth with roles, against a real server and Redis.

Roles: writer creates, reader lists and watches, admin does everything.
No or unknown token -> UNAUTHENTICATED; known token, wrong role ->
PERMISSION_DENIED; health always open; reflection as the setting says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from activity_events.grpc import auth
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

WRITER = "writer-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef00"
BOTH = "both-token-0123456789abcdef000"
TIMEOUT = 5.0

TOKENS_TEXT = f"""
# role        token          name
writer        {WRITER}       pipeline
reader        {READER}       dashboard
admin         {ADMIN}        oncall
reader,writer {BOTH}
"""


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKENS_TEXT)
    return path


@pytest.fixture
async def secured(app_factory: Any, tokens_file: Path) -> Any:
    return await app_factory(auth_tokens_file=tokens_file)


@pytest.fixture
def client(
    secured: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> pb_grpc.ActivityEventsStub:
    return pb_grpc.ActivityEventsStub(channel_factory(secured.port))


def calls(stub: pb_grpc.ActivityEventsStub) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    """One call per RPC; each returns the response (streams: all messages)."""

    async def stream(call: Any) -> list[Any]:
        return [m async for m in call]

    return {
        "CreateEvent": lambda md: stub.CreateEvent(
            pb.EventRequest(id=1, deployment_id=7, message="m"), metadata=md, timeout=TIMEOUT
        ),
        "CreateEvents": lambda md: stub.CreateEvents(
            pb.CreateEventsRequest(events=[pb.EventRequest(id=2, deployment_id=7, message="n")]),
            metadata=md,
            timeout=TIMEOUT,
        ),
        "ListEvents": lambda md: stream(
            stub.ListEvents(pb.Deployment(id=7), metadata=md, timeout=TIMEOUT)
        ),
        "WatchEvents": lambda md: stream(
            stub.WatchEvents(pb.WatchEventsRequest(deployment_id=7), metadata=md, timeout=TIMEOUT)
        ),
        "ListDeployments": lambda md: stub.ListDeployments(
            pb.ListDeploymentsRequest(), metadata=md, timeout=TIMEOUT
        ),
        "DeleteDeployment": lambda md: stub.DeleteDeployment(
            pb.DeleteDeploymentRequest(deployment_id=99), metadata=md, timeout=TIMEOUT
        ),
    }


async def code_of(awaitable: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


ALLOWED = {
    WRITER: {"CreateEvent", "CreateEvents"},
    READER: {"ListEvents", "WatchEvents", "ListDeployments"},
    BOTH: {"CreateEvent", "CreateEvents", "ListEvents", "WatchEvents", "ListDeployments"},
    ADMIN: {
        "CreateEvent",
        "CreateEvents",
        "ListEvents",
        "WatchEvents",
        "ListDeployments",
        "DeleteDeployment",
    },
}


async def test_missing_token_is_unauthenticated_on_every_rpc(
    client: pb_grpc.ActivityEventsStub,
) -> None:
    for name, call in calls(client).items():
        assert await code_of(call(())) == grpc.StatusCode.UNAUTHENTICATED, name


@pytest.mark.parametrize(
    "header",
    [
        ("authorization", "Bearer not-a-known-token-at-all"),
        ("authorization", f"Basic {WRITER}"),
        ("authorization", WRITER),
        ("authorization", "Bearer "),
        ("x-token", WRITER),
    ],
)
async def test_wrong_or_malformed_token_is_unauthenticated(
    client: pb_grpc.ActivityEventsStub, header: tuple[str, str]
) -> None:
    for name, call in calls(client).items():
        assert await code_of(call((header,))) == grpc.StatusCode.UNAUTHENTICATED, name


@pytest.mark.parametrize("token", [WRITER, READER, BOTH, ADMIN])
async def test_roles(client: pb_grpc.ActivityEventsStub, token: str) -> None:
    for name, call in calls(client).items():
        code = await code_of(call(bearer(token)))
        if name in ALLOWED[token]:
            # DeleteDeployment of an unknown deployment: past auth, the servicer answers.
            expected = grpc.StatusCode.NOT_FOUND if name == "DeleteDeployment" else None
            assert code in {grpc.StatusCode.OK, expected}, (name, code)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code)


async def test_scheme_is_case_insensitive_and_admin_deletes(
    client: pb_grpc.ActivityEventsStub,
) -> None:
    response = await client.CreateEvent(
        pb.EventRequest(id=1, deployment_id=5, message="x"),
        metadata=(("authorization", f"bearer {WRITER}"),),
        timeout=TIMEOUT,
    )
    assert response.success
    deleted = await client.DeleteDeployment(
        pb.DeleteDeploymentRequest(deployment_id=5), metadata=bearer(ADMIN), timeout=TIMEOUT
    )
    assert deleted.deleted_events == 1


async def test_refusal_details_never_echo_the_token(client: pb_grpc.ActivityEventsStub) -> None:
    guess = "Bearer guessed-secret-value-123456"
    try:
        await client.ListDeployments(
            pb.ListDeploymentsRequest(), metadata=(("authorization", guess),), timeout=TIMEOUT
        )
    except grpc.aio.AioRpcError as error:
        assert "guessed-secret" not in (error.details() or "")
    else:
        raise AssertionError("an unknown token was accepted")
    try:
        await client.DeleteDeployment(
            pb.DeleteDeploymentRequest(deployment_id=1), metadata=bearer(WRITER), timeout=TIMEOUT
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert WRITER not in (error.details() or "")
        assert "admin" in (error.details() or "")


async def test_unauthenticated_garbage_never_reaches_the_parser(
    secured: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """A refused caller's bytes are not deserialized: refused as UNAUTHENTICATED, not INTERNAL."""
    channel = channel_factory(secured.port)
    raw = channel.unary_unary("/activityevents.ActivityEvents/CreateEvent")
    code = await code_of(raw(b"\xff\xff\xff\xff\x0f garbage", timeout=TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_health_is_open_without_a_token(
    secured: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    health = health_pb2_grpc.HealthStub(channel_factory(secured.port))
    for service in ("", "activityevents.ActivityEvents"):
        response = await health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(channel: grpc.aio.Channel, metadata: Any = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(metadata=metadata, timeout=TIMEOUT)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    responses = [r async for r in call]
    return [s.name for r in responses for s in r.list_services_response.service]


async def test_reflection_needs_a_token_by_default(
    secured: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    channel = channel_factory(secured.port)
    assert await code_of(list_services(channel)) == grpc.StatusCode.UNAUTHENTICATED
    # Any valid token may read the schema, whatever its role.
    assert "activityevents.ActivityEvents" in await list_services(channel, bearer(READER))
    assert "activityevents.ActivityEvents" in await list_services(channel, bearer(WRITER))


async def test_reflection_open_when_configured(
    app_factory: Any, tokens_file: Path, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    app = await app_factory(auth_tokens_file=tokens_file, auth_reflection="open")
    channel = channel_factory(app.port)
    assert "activityevents.ActivityEvents" in await list_services(channel)
    stub = pb_grpc.ActivityEventsStub(channel)
    assert await code_of(stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def test_no_tokens_file_means_no_auth(stub: pb_grpc.ActivityEventsStub) -> None:
    response = await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)
    assert list(response.deployments) == []


async def test_rotated_tokens_file_takes_effect_without_restart(
    client: pb_grpc.ActivityEventsStub, tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RELOAD_INTERVAL", 0.0)
    new_reader = "rotated-reader-token-0123456789"
    tokens_file.write_text(f"reader {new_reader}\n")
    listing = client.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)

    async def accepted(token: str) -> bool:
        code = await code_of(
            client.ListDeployments(
                pb.ListDeploymentsRequest(), metadata=bearer(token), timeout=TIMEOUT
            )
        )
        return code == grpc.StatusCode.OK

    assert await code_of(listing) == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(50):  # the mtime check may need a moment on coarse clocks
        if await accepted(new_reader):
            break
        tokens_file.write_text(f"reader {new_reader}\n")
        await asyncio.sleep(0.05)
    assert await accepted(new_reader)
    assert not await accepted(READER)
    # A broken rewrite keeps the last good tokens instead of locking everyone out.
    tokens_file.write_text("nonsense\n")
    await asyncio.sleep(0.05)
    assert await accepted(new_reader)


async def test_unreadable_or_invalid_tokens_file_stops_the_start(
    app_factory: Any, tmp_path: Path
) -> None:
    with pytest.raises(auth.TokenFileError, match="cannot read"):
        await app_factory(auth_tokens_file=tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text("superuser abcdefghijklmnopqrstuvwxyz\n")
    with pytest.raises(auth.TokenFileError, match="unknown role"):
        await app_factory(auth_tokens_file=bad)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no tokens"),
        ("# only a comment\n", "no tokens"),
        ("writer\n", "expected"),
        ("writer short\n", "shorter than 16"),
        ("writer,root abcdefghijklmnopqrstuvwxyz\n", "unknown role"),
        (
            "writer abcdefghijklmnopqrstuvwxyz\nreader abcdefghijklmnopqrstuvwxyz\n",
            "repeated",
        ),
    ],
)
def test_token_file_errors_name_the_line_not_the_token(text: str, problem: str) -> None:
    with pytest.raises(auth.TokenFileError, match=problem) as raised:
        auth.parse_tokens(text)
    assert "abcdefghijklmnopqrstuvwxyz" not in str(raised.value)


def test_token_table_compares_against_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKENS_TEXT)
    table = auth.TokenTable(path)
    assert table.names == ("pipeline", "dashboard", "oncall", "token-6")
    principal = table.lookup(WRITER)
    assert principal is not None and principal.name == "pipeline"
    assert principal.may("writer") and not principal.may("reader")
    admin = table.lookup(ADMIN)
    assert admin is not None and admin.may("reader") and admin.may("anything")
    assert table.lookup(WRITER[:-1]) is None
    assert table.lookup(WRITER + "x") is None
    assert table.lookup("") is None


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((), None),
        ((("authorization", "Bearer abc"),), "abc"),
        ((("Authorization", "BEARER  abc "),), "abc"),
        ((("authorization", b"Bearer abc"),), "abc"),
        ((("authorization", "Token abc"),), None),
        ((("other", "Bearer abc"),), None),
    ],
)
def test_bearer_token_parsing(metadata: Any, token: str | None) -> None:
    assert auth.bearer_token(metadata) == token


async def test_subscriptions_service_roles(
    secured: Any, channel_factory: Callable[..., grpc.aio.Channel]
) -> None:
    """Listing subscriptions is reading; deleting one is for admins."""
    subs = pb_grpc.SubscriptionsStub(channel_factory(secured.port))

    def listing(md: Any) -> Any:
        return subs.ListSubscriptions(pb.ListSubscriptionsRequest(), metadata=md, timeout=TIMEOUT)

    def deleting(md: Any) -> Any:
        request = pb.DeleteSubscriptionRequest(subscription="nobody-subscribed")
        return subs.DeleteSubscription(request, metadata=md, timeout=TIMEOUT)

    assert await code_of(listing(())) == grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(listing(bearer(WRITER))) == grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(listing(bearer(READER))) == grpc.StatusCode.OK
    assert await code_of(deleting(bearer(READER))) == grpc.StatusCode.PERMISSION_DENIED
    # Past auth the servicer answers (the subscription does not exist).
    assert await code_of(deleting(bearer(ADMIN))) not in {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
