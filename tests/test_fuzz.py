"""Property-based fuzzing of every RPC's request fields against a real server and Redis.

Whatever a client sends (extreme ints, huge or unicode-heavy strings,
malformed cursors and page tokens, empty messages, unknown fields), the
answer is one of the statuses the API documents, never INTERNAL or UNKNOWN,
and the server stays SERVING. Examples are bounded (``max_examples``) so the
file runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
TIMEOUT = 10.0
MAX_RECEIVE = 512 * 1024
"""The fuzzed server's request limit: small, so "bigger than allowed" is cheap to send."""

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)

INT32 = st.one_of(
    st.sampled_from([0, 1, -1, 2, 2**31 - 1, -(2**31), 2**31 - 2, -(2**31) + 1]),
    st.integers(-(2**31), 2**31 - 1),
)
INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 10**18, -(10**18)]),
    st.integers(-(2**63), 2**63 - 1),
)
SMALL_IDS = st.integers(-3, 40)
"""Ids that collide often, so duplicates and conflicts are exercised too."""
UNICODE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)
HUGE = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["a", "é", "€", "𝄞", "\u200b", "\x00"]),
    st.sampled_from([16_383, 16_384, 21_846, 65_536, 65_537, 200_000, 600_000]),
)
"""Strings around the 64 KiB message limit (in UTF-8 bytes) and past the request limit."""
STRINGS = st.one_of(st.just(""), UNICODE, HUGE)
ENTRY = st.builds(lambda a, b: f"{a}-{b}", INT64, INT64)
CURSORS = st.one_of(
    st.just(""),
    UNICODE,
    ENTRY,
    st.builds(lambda d, e: f"{d}:{e}", INT64, ENTRY),
    st.builds(
        lambda d, e: f"{d}:{e}", SMALL_IDS, st.sampled_from(["0-0", "1-1", "99999999999999-0"])
    ),
    st.sampled_from(
        [
            ":",
            "-",
            "1:",
            ":1-0",
            "1:1",
            "1:1-",
            "1:-0",
            "1:a-b",
            "1:1-0-0",
            "01:1-0",
            "1:+1-0",
            " 1:1-0",
            "1:1-0 ",
            "1:1_0",
            "١:١-٠",
            "1:18446744073709551616-0",
            "0:0-0",
            "-1:1-0",
        ]
    ),
)
TIMESTAMPS = st.one_of(
    st.none(), st.builds(lambda s, r: pb.Timestamp(send=s, receive=r), INT64, INT64)
)


def events_strategy(ids: st.SearchStrategy[int] = SMALL_IDS) -> st.SearchStrategy[pb.EventRequest]:
    def build(i: int, d: int, message: str, ts: pb.Timestamp | None) -> pb.EventRequest:
        request = pb.EventRequest(id=i, deployment_id=d, message=message)
        if ts is not None:
            request.timestamp.CopyFrom(ts)
        return request

    return st.builds(
        build,
        st.one_of(ids, INT32),
        st.one_of(st.integers(-2, 6), INT32),
        st.one_of(st.sampled_from(["same", "other"]), STRINGS),
        TIMESTAMPS,
    )


@pytest.fixture
async def fuzzed(app_factory: Any) -> Any:
    return await app_factory(max_receive_bytes=MAX_RECEIVE, max_batch=50, page_size=50)


@pytest.fixture
def client(fuzzed: Any, channel_factory: Any) -> pb_grpc.ActivityEventsStub:
    return pb_grpc.ActivityEventsStub(channel_factory(fuzzed.port))


async def outcome(awaitable: Any) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as error:
        assert error.code() in ALLOWED, (error.code(), error.details())
        return error.code()
    return grpc.StatusCode.OK


async def drain(call: Any) -> list[Any]:
    try:
        return [m async for m in call]
    finally:
        call.cancel()


async def assert_serving(app: Any, channel_factory: Any) -> None:
    health = health_pb2_grpc.HealthStub(channel_factory(app.port))
    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@FUZZ
@given(request=events_strategy())
async def test_create_event(
    client: pb_grpc.ActivityEventsStub, fuzzed: Any, channel_factory: Any, request: pb.EventRequest
) -> None:
    code = await outcome(client.CreateEvent(request, timeout=TIMEOUT))
    if request.ByteSize() > MAX_RECEIVE:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own check, before the handler
    elif request.deployment_id <= 0 or request.id < 0 or len(request.message.encode()) > 65536:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    await assert_serving(fuzzed, channel_factory)


@FUZZ
@given(events=st.lists(events_strategy(), max_size=60))
async def test_create_events(
    client: pb_grpc.ActivityEventsStub,
    fuzzed: Any,
    channel_factory: Any,
    events: list[pb.EventRequest],
) -> None:
    request = pb.CreateEventsRequest(events=events)
    try:
        response = await client.CreateEvents(request, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as error:
        assert error.code() in {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }
        assert len(events) > 50 or request.ByteSize() > MAX_RECEIVE, error.details()
    else:
        assert [r.index for r in response.results] == list(range(len(events)))
        for event, result in zip(events, response.results, strict=True):
            assert result.outcome != pb.OUTCOME_UNSPECIFIED
            if event.deployment_id <= 0 or event.id < 0:
                assert result.outcome == pb.OUTCOME_INVALID
    await assert_serving(fuzzed, channel_factory)


@FUZZ
@given(deployment=st.one_of(SMALL_IDS, INT32))
async def test_list_events(
    client: pb_grpc.ActivityEventsStub, fuzzed: Any, channel_factory: Any, deployment: int
) -> None:
    code = await outcome(drain(client.ListEvents(pb.Deployment(id=deployment), timeout=TIMEOUT)))
    assert (code == grpc.StatusCode.INVALID_ARGUMENT) == (deployment < 0)
    await assert_serving(fuzzed, channel_factory)


@FUZZ
@given(
    request=st.builds(
        pb.WatchEventsRequest,
        deployment_id=st.one_of(SMALL_IDS, INT32),
        after=CURSORS,
        limit=st.one_of(st.integers(-2, 5), INT32),
        follow=st.booleans(),
    )
)
async def test_watch_events(
    client: pb_grpc.ActivityEventsStub,
    fuzzed: Any,
    channel_factory: Any,
    request: pb.WatchEventsRequest,
) -> None:
    call = client.WatchEvents(request, timeout=TIMEOUT)

    async def until_caught_up() -> None:
        # A follow stream never ends by itself: read the history up to the marker.
        async for message in call:
            if message.caught_up:
                return

    try:
        code = await outcome(until_caught_up())
    finally:
        call.cancel()
    if request.deployment_id < 0 or request.limit < 0:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    await assert_serving(fuzzed, channel_factory)


PAGE_TOKENS = st.one_of(
    st.just(""),
    UNICODE,
    st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.builds(lambda n: base64.urlsafe_b64encode(f"after:{n}".encode()).decode(), INT64),
)


@FUZZ
@given(page_size=st.one_of(st.integers(-2, 1002), INT32), token=PAGE_TOKENS)
async def test_list_deployments(
    client: pb_grpc.ActivityEventsStub,
    fuzzed: Any,
    channel_factory: Any,
    page_size: int,
    token: str,
) -> None:
    request = pb.ListDeploymentsRequest(page_size=page_size, page_token=token)
    code = await outcome(client.ListDeployments(request, timeout=TIMEOUT))
    if not 0 <= page_size <= 1000:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    await assert_serving(fuzzed, channel_factory)


@FUZZ
@given(deployment=st.one_of(st.integers(-2, 8), INT32))
async def test_delete_deployment(
    client: pb_grpc.ActivityEventsStub, fuzzed: Any, channel_factory: Any, deployment: int
) -> None:
    request = pb.DeleteDeploymentRequest(deployment_id=deployment)
    code = await outcome(client.DeleteDeployment(request, timeout=TIMEOUT))
    if deployment <= 0:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    await assert_serving(fuzzed, channel_factory)


# -- raw bytes: unknown fields and empty messages through a generic call -------------

METHODS: dict[str, tuple[type[Any], bool]] = {
    "CreateEvent": (pb.EventRequest, False),
    "ListEvents": (pb.Deployment, True),
    "WatchEvents": (pb.WatchEventsRequest, True),
    "CreateEvents": (pb.CreateEventsRequest, False),
    "ListDeployments": (pb.ListDeploymentsRequest, False),
    "DeleteDeployment": (pb.DeleteDeploymentRequest, False),
}


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def unknown_field(number: int, kind: int, payload: bytes | int) -> bytes:
    """One wire-format field: varint (0), 64-bit (1), length-delimited (2) or 32-bit (5)."""
    key = varint((number << 3) | kind)
    if kind == 0:
        assert isinstance(payload, int)
        return key + varint(payload)
    assert isinstance(payload, bytes)
    if kind == 2:
        return key + varint(len(payload)) + payload
    return key + payload


FIELD_NUMBERS = st.integers(8, 10_000)
"""Field numbers no request message uses (the largest known one is 4)."""
UNKNOWN_FIELDS = st.lists(
    st.one_of(
        st.builds(unknown_field, st.integers(5, 536_870_911), st.just(0), INT64),
        st.builds(unknown_field, FIELD_NUMBERS, st.just(1), st.binary(min_size=8, max_size=8)),
        st.builds(unknown_field, FIELD_NUMBERS, st.just(2), st.binary(max_size=2000)),
        st.builds(unknown_field, FIELD_NUMBERS, st.just(5), st.binary(min_size=4, max_size=4)),
    ),
    max_size=5,
).map(b"".join)


def known_fields(message_type: type[Any]) -> st.SearchStrategy[bytes]:
    """A valid-looking serialized request of ``message_type`` (sometimes empty)."""
    if message_type is pb.EventRequest:
        return events_strategy().map(lambda m: m.SerializeToString())
    if message_type is pb.CreateEventsRequest:
        return st.lists(events_strategy(), max_size=5).map(
            lambda e: pb.CreateEventsRequest(events=e).SerializeToString()
        )
    if message_type is pb.WatchEventsRequest:
        return st.builds(
            pb.WatchEventsRequest,
            deployment_id=SMALL_IDS,
            after=CURSORS,
            limit=st.integers(-1, 3),
        ).map(lambda m: m.SerializeToString())
    if message_type is pb.ListDeploymentsRequest:
        return st.builds(
            lambda p: pb.ListDeploymentsRequest(page_size=p).SerializeToString(), st.integers(-1, 5)
        )
    if message_type is pb.DeleteDeploymentRequest:
        return st.builds(
            lambda d: pb.DeleteDeploymentRequest(deployment_id=d).SerializeToString(), SMALL_IDS
        )
    return st.builds(lambda d: pb.Deployment(id=d).SerializeToString(), SMALL_IDS)


@FUZZ
@given(data=st.data(), method=st.sampled_from(sorted(METHODS)))
async def test_unknown_fields_and_empty_messages(
    fuzzed: Any, channel_factory: Any, data: st.DataObject, method: str
) -> None:
    """Raw request bytes: known fields in any order with unknown fields mixed in, or nothing."""
    message_type, streaming = METHODS[method]
    known = data.draw(st.one_of(st.just(b""), known_fields(message_type)), label="known")
    extra = data.draw(UNKNOWN_FIELDS, label="unknown")
    before = data.draw(st.booleans(), label="unknown first")
    raw = extra + known if before else known + extra
    channel = channel_factory(fuzzed.port)
    path = f"/activityevents.ActivityEvents/{method}"
    if streaming:
        call = channel.unary_stream(path)(raw, timeout=TIMEOUT)
        await outcome(asyncio.wait_for(drain(call), TIMEOUT))
    else:
        await outcome(channel.unary_unary(path)(raw, timeout=TIMEOUT))
    await assert_serving(fuzzed, channel_factory)


@pytest.mark.parametrize("method", sorted(METHODS))
async def test_empty_message_of_every_rpc(
    client: pb_grpc.ActivityEventsStub, fuzzed: Any, channel_factory: Any, method: str
) -> None:
    """The all-defaults request of each RPC gets a documented answer."""
    message_type, streaming = METHODS[method]
    rpc = getattr(client, method)
    if streaming:
        code = await outcome(drain(rpc(message_type(), timeout=TIMEOUT)))
    else:
        code = await outcome(rpc(message_type(), timeout=TIMEOUT))
    expected = {
        "CreateEvent": grpc.StatusCode.INVALID_ARGUMENT,  # deployment_id 0
        "DeleteDeployment": grpc.StatusCode.INVALID_ARGUMENT,
    }.get(method, grpc.StatusCode.OK)
    assert code == expected
    await assert_serving(fuzzed, channel_factory)


def corrupt(raw: bytes, position: int, junk: bytes) -> bytes:
    """``raw`` with ``junk`` spliced in at ``position`` (modulo its length)."""
    at = position % (len(raw) + 1)
    return raw[:at] + junk + raw[at:]


UNDECODABLE = st.one_of(
    st.sampled_from(
        [
            b"\xff\xff\xff",  # a field key whose varint never ends
            b"\x0a\x05abc",  # length-delimited field longer than the message
            b"\x12\x02\xff\xfe",  # EventRequest.message (a string) that is not UTF-8
            b"\x07",  # wire type 7 does not exist
            b"\x00\x01",  # field number 0
        ]
    ),
    st.binary(min_size=1, max_size=64),
)


@FUZZ
@given(data=st.data(), method=st.sampled_from(sorted(METHODS)))
async def test_undecodable_request_bytes_are_invalid_argument(
    fuzzed: Any, channel_factory: Any, data: st.DataObject, method: str
) -> None:
    """Bytes that are no valid request are the client's fault: INVALID_ARGUMENT, never UNKNOWN."""
    message_type, streaming = METHODS[method]
    base = data.draw(known_fields(message_type), label="valid")
    junk = data.draw(UNDECODABLE, label="junk")
    raw = corrupt(base, data.draw(st.integers(0, 1 << 16), label="at"), junk)
    try:
        message_type.FromString(raw)
    except Exception:  # any parse failure makes this a case for the test
        decodable = False
    else:
        decodable = True
    channel = channel_factory(fuzzed.port)
    path = f"/activityevents.ActivityEvents/{method}"
    try:
        if streaming:
            await asyncio.wait_for(drain(channel.unary_stream(path)(raw, timeout=TIMEOUT)), TIMEOUT)
        else:
            await channel.unary_unary(path)(raw, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as error:
        if len(raw) > MAX_RECEIVE:  # gRPC's size check comes before any parsing
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        elif decodable:
            assert error.code() in ALLOWED, (error.code(), error.details())
        else:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
            assert "DecodeError" not in (error.details() or ""), error.details()
    else:
        assert decodable, f"{raw!r} does not parse as {message_type.__name__} yet was accepted"
    await assert_serving(fuzzed, channel_factory)
