"""``activity-client``: its output formats, and the real CLI against a real server.

The formatting functions are tested directly. Everything else runs the CLI as
a subprocess (``python -m activity_events.client``), the way users and
container health checks run it, against an in-process server on a private
redis-server: output lines, exit codes, follow and Ctrl-C, import/export.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import pty
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from activity_events.cli.arguments import deployments_parser, split_command
from activity_events.cli.connection import (
    ROUND_ROBIN_CONFIG,
    Connection,
    build_target,
    channel_options,
    options_from_args,
    trace_metadata,
)
from activity_events.cli.errors import ExitCode
from activity_events.cli.event_input import EventInputError, event_from_json, stamp_send_time
from activity_events.cli.formatting import (
    created_line,
    event_json,
    event_line,
    format_time_ns,
    go_quote,
    go_text,
    line_list,
    logrus_line,
    shorten,
    table,
)
from activity_events.cli.progress import ProgressBar, render
from activity_events.cli.transfer import ImportSummary
from activity_events.pb import activityevents_pb2 as pb
from tests.support.ports import free_port
from tests.support_reliability import Authority

CLI = [sys.executable, "-m", "activity_events.client"]

#: Deadline for one CLI run; far above what any command here needs.
RUN_TIMEOUT = 30.0

#: Legacy -add line; the figure is the server's execution time in ms.
CREATED = re.compile(
    r"^INFO\[\d{4}\] An event created with id \[(\d+)\] for deployment_id \[(\d+)\] in (\d+) ms\s*$"
)
#: Legacy listing line, Go's compact text of the EventRequest.
LISTED = re.compile(
    r'^INFO\[\d{4}\] Event: id:(\d+) message:"(.*)" '
    r"timestamp:<send:(\d+) receive:(\d+) > deployment_id:(\d+)\s*$"
)


# --------------------------------------------------------------------------- helpers


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def out_lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if line.strip()]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_COLOR"] = "1"
    return env


async def run_cli(
    *args: str,
    stdin: bytes | None = None,
    timeout: float = RUN_TIMEOUT,
    env: dict[str, str] | None = None,
) -> Result:
    """Run the CLI to completion with piped stdin/stdout/stderr (never blocks the loop).

    ``env`` adds variables to the child's environment.
    """
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**child_env(), **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def read_all(fd: int, limit_seconds: float) -> bytes:
    """Read a pty master until the other side closes (EIO) or time runs out."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def run_cli_with_tty(
    *args: str, tty_stdin: bool = False, answer: bytes = b""
) -> tuple[int, str, str]:
    """Run the CLI with stderr (and optionally stdin) on a pseudo-terminal.

    Returns (exit code, stdout, everything written to the terminal).
    """
    master, slave = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            *CLI,
            *args,
            stdin=slave if tty_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=child_env(),
        )
        os.close(slave)
        slave = -1
        try:
            if answer:
                os.write(master, answer)
            reader = asyncio.create_task(asyncio.to_thread(read_all, master, RUN_TIMEOUT))
            assert process.stdout is not None
            out = await asyncio.wait_for(process.stdout.read(), RUN_TIMEOUT)
            code = await asyncio.wait_for(process.wait(), RUN_TIMEOUT)
            terminal = await asyncio.wait_for(reader, RUN_TIMEOUT + 1)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return code, out.decode(), terminal.decode(errors="replace")


def connect(app: Any) -> list[str]:
    return ["-port", str(app.port)]


async def create(stub: Any, deployment: int, event_id: int, message: str) -> pb.EventResponse:
    request = pb.EventRequest(id=event_id, deployment_id=deployment, message=message)
    request.timestamp.send = time.time_ns()
    response: pb.EventResponse = await stub.CreateEvent(request, timeout=10)
    return response


async def history(stub: Any, deployment: int) -> list[pb.EventRequest]:
    async def collect() -> list[pb.EventRequest]:
        return [event async for event in stub.ListEvents(pb.Deployment(id=deployment))]

    return await asyncio.wait_for(collect(), 10)


def assert_one_error_line(result: Result) -> str:
    """Failures print exactly one line on stderr, and never a traceback."""
    assert "Traceback" not in result.err, result.err
    assert len(result.err_lines) == 1, result.err
    return result.err_lines[0]


# --------------------------------------------------------------------------- pure formatting


def test_go_quote_escapes_like_golang_protobuf() -> None:
    assert go_quote('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert go_quote("a\nb\tc\rd") == '"a\\nb\\tc\\rd"'
    # non-ASCII: octal escape per UTF-8 byte, as Go's text marshaller walked bytes
    assert go_quote("ü") == '"\\303\\274"'
    assert go_quote("\x01\x7f") == '"\\001\\177"'
    assert go_quote("it's") == '"it\'s"'


def test_go_text_matches_gos_compact_string() -> None:
    event = pb.EventRequest(id=1, message="ok", deployment_id=1)
    event.timestamp.send = 1569500037894488000
    event.timestamp.receive = 1569500037898843000
    assert go_text(event) == (
        'id:1 message:"ok" timestamp:<send:1569500037894488000 '
        "receive:1569500037898843000 > deployment_id:1 "
    )


def test_go_text_leaves_out_zero_fields_and_shows_empty_messages() -> None:
    assert go_text(pb.EventRequest(deployment_id=3)) == "deployment_id:3 "
    event = pb.EventRequest(id=2)
    event.timestamp.SetInParent()
    assert go_text(event) == "id:2 timestamp:<> "
    assert go_text(pb.EventRequest()) == ""


def test_go_text_renders_enums_bools_and_repeated_fields() -> None:
    response = pb.CreateEventsResponse(
        results=[
            pb.EventResult(index=0, outcome=pb.OUTCOME_CREATED),
            pb.EventResult(index=1, outcome=pb.OUTCOME_CONFLICT, reason="x"),
        ]
    )
    assert go_text(response) == (
        'results:<outcome:OUTCOME_CREATED > results:<index:1 outcome:OUTCOME_CONFLICT reason:"x" > '
    )
    assert go_text(pb.EventResponse(id=1, success=True)) == "id:1 success:true "


def test_logrus_line_pads_like_logrus_text_formatter() -> None:
    assert logrus_line("info", "short", 4.9) == "INFO[0004] " + "short".ljust(44) + " "
    long = "An event created with id [1] for deployment_id [1] in 4 ms"
    assert logrus_line("info", long, 0.2) == f"INFO[0000] {long} "
    assert logrus_line("error", "boom\n", 12) == "ERRO[0012] " + "boom".ljust(44) + " "
    assert logrus_line("info", "x", 0, colour=True).startswith("\x1b[36mINFO\x1b[0m[0000] x")


def test_legacy_message_lines() -> None:
    assert created_line(1, 2, 4, duplicate=False) == (
        "An event created with id [1] for deployment_id [2] in 4 ms"
    )
    assert created_line(1, 2, 0, duplicate=True) == (
        "An event with id [1] for deployment_id [2] was already stored"
    )
    event = pb.EventRequest(id=5, message="m", deployment_id=2)
    assert event_line(event) == 'Event: id:5 message:"m" deployment_id:2 '
    assert event_line(event, "2:1-0") == 'Event: id:5 message:"m" deployment_id:2 cursor:"2:1-0"'


def test_event_json_is_proto3_json_with_cursor() -> None:
    event = pb.EventRequest(id=5, message="ünï", deployment_id=2)
    event.timestamp.send = 10
    event.timestamp.receive = 20
    line = event_json(event, "2:1-0")
    assert "\n" not in line
    assert json.loads(line) == {
        "id": 5,
        "message": "ünï",
        "deployment_id": 2,
        "timestamp": {"send": "10", "receive": "20"},
        "cursor": "2:1-0",
    }
    # zero-valued fields are kept for scripts
    assert json.loads(event_json(pb.EventRequest(id=1, deployment_id=1), "1:1-0"))["message"] == ""


def test_table_aligns_columns_without_trailing_spaces() -> None:
    text = table(
        ["ID", "NAME", "NOTE"], [["1", "alpha", "x"], ["100", "b", ""]], [True, False, False]
    )
    assert text.splitlines() == [" ID  NAME   NOTE", "  1  alpha  x", "100  b"]


def test_shorten_time_and_line_list() -> None:
    assert shorten("abcdef", 4) == "abc…"
    assert shorten("ab\ncd", 10) == "ab…"
    assert shorten("abc", 3) == "abc"
    assert shorten("", 3) == ""
    assert format_time_ns(0) == "-"
    assert format_time_ns(1_700_000_000_123_456_789, tz=UTC) == "2023-11-14 22:13:20.123"
    assert line_list([3, 7]) == "3, 7"
    assert line_list(list(range(1, 26)), most=3) == "1, 2, 3 and 22 more"


def test_import_summary_line_names_rejected_lines() -> None:
    summary = ImportSummary("f.jsonl", created=3, duplicates=1)
    assert summary.line() == "f.jsonl: 3 created, 1 duplicates, 0 conflicts, 0 invalid"
    assert not summary.rejected
    summary.conflicts.append((4, "id taken"))
    summary.invalid.extend([(2, "bad"), (9, "worse")])
    assert summary.line().endswith(
        "1 conflicts, 2 invalid; conflicts at lines 4; invalid at lines 2, 9"
    )
    assert json.loads(summary.as_json())["invalid"] == [
        {"line": 2, "reason": "bad"},
        {"line": 9, "reason": "worse"},
    ]


def test_progress_render_and_silence_when_disabled(tmp_path: Path) -> None:
    assert render("import", 50, 100, 7) == "import [" + "#" * 15 + "-" * 15 + "]  50% 7 events"
    assert render("import", 10, None, 7) == "import 7 events"
    with (tmp_path / "err").open("w+") as stream:
        bar = ProgressBar(stream, "import", 100, enabled=False)
        bar.update(50, 1, force=True)
        bar.close()
        stream.seek(0)
        assert stream.read() == ""


@pytest.mark.parametrize(
    ("address", "port", "target"),
    [
        ("127.0.0.1", 50051, "127.0.0.1:50051"),
        ("example.org", 7, "example.org:7"),
        ("example.org:9000", 7, "example.org:9000"),
        ("::1", 7, "[::1]:7"),
        ("[::1]", 7, "[::1]:7"),
        ("[::1]:9000", 7, "[::1]:9000"),
        ("dns:///svc.ns:50051", 7, "dns:///svc.ns:50051"),
        ("unix:/run/ae.sock", 7, "unix:/run/ae.sock"),
    ],
)
def test_build_target(address: str, port: int, target: str) -> None:
    assert build_target(address, port) == target


def test_dns_targets_ask_for_round_robin() -> None:
    assert ("grpc.service_config", ROUND_ROBIN_CONFIG) in channel_options("dns:///svc:1")
    assert all(name != "grpc.service_config" for name, _ in channel_options("host:1"))
    assert json.loads(ROUND_ROBIN_CONFIG) == {"loadBalancingConfig": [{"round_robin": {}}]}


def test_event_input_accepts_go_and_proto3_spellings() -> None:
    event = event_from_json('{"ID": 3, "Deployment_Id": 4, "message": "m"}')
    assert (event.id, event.deployment_id, event.message) == (3, 4, "m")
    assert event_from_json('{"deploymentId": 5}').deployment_id == 5
    event = event_from_json('{"id": 1, "cursor": "1:1-0"}', ignore=frozenset({"cursor"}))
    assert event.id == 1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{bad", "malformed JSON"),
        ("[1]", "expected a JSON object"),
        ('{"id": 1, "deploymnet_id": 2}', "unknown field 'deploymnet_id'"),
        ('{"id": "x"}', "id"),
        ('{"id": 1, "ID": 2}', "given twice"),
        ('{"timestamp": {"sent": 1}}', "sent"),
    ],
)
def test_event_input_rejects_bad_events(text: str, fragment: str) -> None:
    with pytest.raises(EventInputError, match=re.escape(fragment)):
        event_from_json(text)


def test_send_time_is_stamped_unless_given() -> None:
    event = pb.EventRequest(id=1)
    stamp_send_time(event, now_ns=42)
    assert event.timestamp.send == 42
    stamp_send_time(event, now_ns=99)
    assert event.timestamp.send == 42


def test_split_command_allows_connection_flags_first() -> None:
    assert split_command(["health", "--port", "1"]) == ("health", ["--port", "1"])
    assert split_command(["-port", "1", "-address=h", "health", "--json"]) == (
        "health",
        ["--json", "-port", "1", "-address=h"],
    )
    assert split_command(["-deployment", "1"]) == (None, ["-deployment", "1"])
    assert split_command(["-add", "health"]) == (None, ["-add", "health"])


def test_client_imports_nothing_heavy() -> None:
    """Start-up speed: the CLI must not pull in the server's stack (pydantic, redis)."""
    probe = (
        "import sys, time; t = time.perf_counter(); import activity_events.client; "
        "print(time.perf_counter() - t, 'pydantic' in sys.modules, 'redis' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert output[1:] == ["False", "False"]
    # ~0.15 s on an idle machine; the bound only catches gross regressions on a busy one
    assert float(output[0]) < 2.0


# --------------------------------------------------------------------------- legacy flags


async def test_no_arguments_prints_help_and_exits_0() -> None:
    result = await run_cli()
    assert result.code == ExitCode.OK
    assert "-add JSON" in result.out
    assert "-deployment N" in result.out
    assert "exit codes:" in result.out


@pytest.mark.parametrize(
    "command", [[], ["health"], ["deployments"], ["delete"], ["export"], ["import"]]
)
async def test_every_command_has_help_with_examples(command: list[str]) -> None:
    result = await run_cli(*command, "--help")
    assert result.code == ExitCode.OK
    assert "examples:" in result.out
    assert "exit codes:" in result.out
    assert "  3 " in result.out


async def test_add_and_list_print_the_original_lines(server: Any) -> None:
    add = '{"id":1, "deployment_id": 11, "message":"Deployment has been created successfully"}'
    before = time.time_ns()
    result = await run_cli("-add", add, *connect(server))
    assert result.code == ExitCode.OK, result.err
    assert result.out == ""  # logrus wrote to stderr
    [line] = result.err_lines
    created = CREATED.match(line)
    assert created, line
    assert created.group(1, 2) == ("1", "11")
    assert int(created.group(3)) < 5000

    # double-dash spelling and -flag=value work the same
    result = await run_cli(
        "--add", '{"id":2,"deployment_id":11,"message":"two \\"q\\""}', f"--port={server.port}"
    )
    assert result.code == ExitCode.OK, result.err

    result = await run_cli("-deployment", "11", *connect(server))
    assert result.code == ExitCode.OK, result.err
    matches = [LISTED.match(line) for line in result.err_lines]
    assert all(matches), result.err
    rows = [m.groups() for m in matches if m]
    assert [(r[0], r[1], r[4]) for r in rows] == [
        ("1", "Deployment has been created successfully", "11"),
        ("2", 'two \\"q\\"', "11"),
    ]
    send, receive = int(rows[0][2]), int(rows[0][3])
    assert before <= send <= receive  # -add stamped timestamp.send with "now" in ns


async def test_duplicate_add_says_so(server: Any) -> None:
    add = '{"id":1, "deployment_id": 12, "message":"once"}'
    assert (await run_cli("-add", add, *connect(server))).code == ExitCode.OK
    result = await run_cli("-add", add, *connect(server))
    assert result.code == ExitCode.OK
    assert re.match(
        r"^INFO\[\d{4}\] An event with id \[1\] for deployment_id \[12\] was already stored\s*$",
        result.err_lines[0],
    )


async def test_add_with_json_prints_the_response(server: Any) -> None:
    add = '{"id":3, "deployment_id": 14, "message":"as json"}'
    for duplicate in (False, True):
        result = await run_cli("-add", add, "--json", *connect(server))
        assert result.code == ExitCode.OK, result.err
        response = json.loads(result.out)
        assert response["id"] == 3
        assert response["deployment_id"] == 14
        assert response["success"] is True
        assert response["duplicate"] is duplicate
        assert response["cursor"].startswith("14:")


async def test_deployment_0_lists_all_deployments(server: Any, stub: Any) -> None:
    await create(stub, 21, 1, "a")
    await create(stub, 22, 1, "b")
    await create(stub, 21, 2, "c")
    result = await run_cli("-deployment", "0", *connect(server))
    assert result.code == ExitCode.OK
    seen = [(m.group(5), m.group(2)) for m in map(LISTED.match, result.err_lines) if m]
    assert seen == [("21", "a"), ("22", "b"), ("21", "c")]


async def test_conflict_is_a_one_line_server_error(server: Any) -> None:
    assert (
        await run_cli("-add", '{"id":1,"deployment_id":13,"message":"a"}', *connect(server))
    ).code == 0
    result = await run_cli("-add", '{"id":1,"deployment_id":13,"message":"b"}', *connect(server))
    assert result.code == ExitCode.FAILED
    line = assert_one_error_line(result)
    assert line.startswith("ERRO[")
    assert "ALREADY_EXISTS" in line


async def test_invalid_event_is_a_server_error(server: Any) -> None:
    result = await run_cli("-add", '{"id":1,"deployment_id":0,"message":"a"}', *connect(server))
    assert result.code == ExitCode.FAILED
    assert "INVALID_ARGUMENT" in assert_one_error_line(result)
    assert "deployment_id" in result.err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-add", "{not json"], "malformed JSON"),
        (["-add", '{"id":1,"deploymnet_id":2}'], "unknown field"),
        (["-add", '{"id":"one"}'], "id"),
        (["-deployment", "x"], "not an integer"),
        (["-deployment", "-1"], "not a deployment id"),
        (["--follow"], "need -deployment"),
        (["-port", "1"], "nothing to do"),
        (["-nope"], "unrecognized arguments"),
        (["-deployment", "1", "--limit", "-5"], "limit"),
        (["health", "--timeout", "0"], "timeout"),
    ],
)
async def test_bad_input_exits_2_with_one_line(args: list[str], fragment: str) -> None:
    port = free_port()  # nothing listens: bad input must be caught before connecting
    result = await run_cli(*args, "-port", str(port))
    assert result.code == ExitCode.USAGE, result.err
    assert fragment in assert_one_error_line(result)


async def test_unreachable_server_exits_3_within_the_timeout() -> None:
    started = time.monotonic()
    result = await run_cli("-deployment", "1", "-port", str(free_port()), "--timeout", "1")
    elapsed = time.monotonic() - started
    assert result.code == ExitCode.UNAVAILABLE
    assert "cannot reach the server" in assert_one_error_line(result)
    assert elapsed < 10


async def test_address_accepts_host_port_and_dns_targets(server: Any) -> None:
    for address in (f"127.0.0.1:{server.port}", f"dns:///localhost:{server.port}"):
        result = await run_cli("-deployment", "1", "-address", address, "-port", "1")
        assert result.code == ExitCode.OK, (address, result.err)


# --------------------------------------------------------------------------- new listing flags


async def test_json_lines_after_and_limit(server: Any, stub: Any) -> None:
    for event_id in (1, 2, 3):
        await create(stub, 31, event_id, f"m{event_id}")
    result = await run_cli("-deployment", "31", "--json", *connect(server))
    assert result.code == ExitCode.OK, result.err
    lines = [json.loads(line) for line in result.out_lines]
    assert [line["id"] for line in lines] == [1, 2, 3]
    assert all(line["deployment_id"] == 31 and line["cursor"].startswith("31:") for line in lines)
    assert int(lines[0]["timestamp"]["receive"]) > 0

    result = await run_cli(
        "-deployment",
        "31",
        "--json",
        "--after",
        lines[0]["cursor"],
        "--limit",
        "1",
        *connect(server),
    )
    assert [json.loads(line)["id"] for line in result.out_lines] == [2]

    # without --json the watch lines are the legacy line plus the cursor
    result = await run_cli("-deployment", "31", "-after", lines[1]["cursor"], *connect(server))
    assert result.code == ExitCode.OK
    assert re.match(r'^INFO\[\d{4}\] Event: id:3 .* cursor:"31:\d+-\d+"\s*$', result.err_lines[0])


async def test_malformed_cursor_is_a_server_error(server: Any) -> None:
    result = await run_cli("-deployment", "1", "--after", "garbage", *connect(server))
    assert result.code == ExitCode.FAILED
    line = assert_one_error_line(result)
    assert "INVALID_ARGUMENT" in line
    assert "after" in line


@pytest.mark.parametrize("as_json", [False, True])
async def test_follow_prints_new_events_and_ctrl_c_exits_0(
    server: Any, stub: Any, as_json: bool
) -> None:
    await create(stub, 41, 1, "old")
    args = ["-deployment", "41", "--follow", *connect(server)] + (["--json"] if as_json else [])
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env()
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stream = process.stdout if as_json else process.stderr
    try:
        first = (await asyncio.wait_for(stream.readline(), 10)).decode()
        assert "old" in first
        if not as_json:
            caught_up = (await asyncio.wait_for(stream.readline(), 10)).decode()
            assert "Caught up" in caught_up
        else:
            await asyncio.sleep(0.5)  # the caught_up marker is not printed in JSON mode
        await create(stub, 41, 2, "live one")
        live = (await asyncio.wait_for(stream.readline(), 10)).decode()
        if as_json:
            assert json.loads(live)["message"] == "live one"
        else:
            assert 'Event: id:2 message:"live one"' in live
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 10)
        rest = (await asyncio.wait_for(process.stderr.read(), 5)).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == ExitCode.OK
    assert "Traceback" not in rest


# --------------------------------------------------------------------------- health


async def test_health_serving_exits_0(server: Any) -> None:
    for service in ("", "activityevents.ActivityEvents"):
        started = time.monotonic()
        result = await run_cli("health", "--service", service, *connect(server))
        assert result.code == ExitCode.OK, result.err
        assert result.out.strip() == "SERVING"
        assert time.monotonic() - started < 5
    result = await run_cli("--port", str(server.port), "health", "--json")
    assert json.loads(result.out) == {"service": "", "status": "SERVING"}


async def test_health_unknown_service_exits_1(server: Any) -> None:
    result = await run_cli("health", "--service", "no.such.Service", *connect(server))
    assert result.code == ExitCode.FAILED
    assert result.out.strip() == "SERVICE_UNKNOWN"


async def test_health_with_nothing_listening_exits_1_fast() -> None:
    started = time.monotonic()
    result = await run_cli("health", "-port", str(free_port()), "--timeout", "1")
    assert result.code == ExitCode.FAILED  # never 2: Docker reserves it
    assert "cannot reach the server" in assert_one_error_line(result)
    assert time.monotonic() - started < 8


def test_trace_context_comes_from_the_environment() -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert trace_metadata({"TRACEPARENT": parent, "TRACESTATE": "k=v"}) == [
        ("traceparent", parent),
        ("tracestate", "k=v"),
    ]
    assert trace_metadata({}) == []
    for bad in (
        "garbage",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    ):
        assert trace_metadata({"TRACEPARENT": bad, "TRACESTATE": "k=v"}) == [], bad


# --------------------------------------------------------------------------- deployments, delete


async def test_deployments_table_and_json(server: Any, stub: Any) -> None:
    await create(stub, 51, 1, "first")
    await create(stub, 51, 2, "second line\nof text")
    await create(stub, 52, 1, "x" * 200)
    result = await run_cli("deployments", *connect(server))
    assert result.code == ExitCode.OK, result.err
    header, *rows = result.out_lines
    assert header.split() == [
        "DEPLOYMENT",
        "EVENTS",
        "FIRST",
        "EVENT",
        "LAST",
        "EVENT",
        "LAST",
        "MESSAGE",
    ]
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) == {"51", "52"}
    # numbers are right-aligned under their headers, messages cut to one short line
    events_end = header.index("EVENTS") + len("EVENTS")
    assert by_id["51"][:events_end].endswith(" 2")
    assert by_id["51"].endswith("second line…")
    assert len(by_id["52"]) < 140
    assert by_id["52"].endswith("…")

    result = await run_cli("deployments", "--json", *connect(server))
    infos = {item["id"]: item for item in map(json.loads, result.out_lines)}
    assert set(infos) == {51, 52}
    assert infos[51]["event_count"] == "2"
    assert infos[51]["last_event"]["event"]["message"] == "second line\nof text"
    assert infos[51]["last_event"]["cursor"].startswith("51:")


async def test_deployments_when_there_are_none(server: Any) -> None:
    result = await run_cli("deployments", *connect(server))
    assert result.code == ExitCode.OK
    assert result.out == ""
    assert "no deployments" in result.err


async def test_delete_refuses_without_yes_when_stdin_is_not_a_terminal(
    server: Any, stub: Any
) -> None:
    await create(stub, 53, 1, "keep me")
    result = await run_cli("delete", "--deployment", "53", *connect(server))
    assert result.code == ExitCode.USAGE
    assert "--yes" in assert_one_error_line(result)
    assert len(await history(stub, 53)) == 1


async def test_delete_with_yes(server: Any, stub: Any) -> None:
    await create(stub, 54, 1, "a")
    await create(stub, 54, 2, "b")
    result = await run_cli("delete", "--deployment", "54", "--yes", *connect(server))
    assert result.code == ExitCode.OK, result.err
    assert result.out.strip() == "deleted deployment 54: 2 events"
    assert await history(stub, 54) == []

    result = await run_cli("delete", "--deployment", "54", "--yes", *connect(server))
    assert result.code == ExitCode.FAILED
    assert "NOT_FOUND" in assert_one_error_line(result)

    await create(stub, 54, 1, "again")
    result = await run_cli("delete", "-deployment=54", "-yes", "--json", *connect(server))
    assert json.loads(result.out) == {"deployment_id": 54, "deleted_events": 1}


async def test_delete_asks_for_confirmation_on_a_terminal(server: Any, stub: Any) -> None:
    await create(stub, 55, 1, "a")
    args = ("delete", "--deployment", "55", *connect(server))
    code, out, terminal = await run_cli_with_tty(*args, tty_stdin=True, answer=b"n\n")
    assert code == ExitCode.FAILED
    assert "Delete deployment 55" in terminal
    assert "aborted" in terminal
    assert out == ""
    assert len(await history(stub, 55)) == 1

    code, out, terminal = await run_cli_with_tty(*args, tty_stdin=True, answer=b"yes\n")
    assert code == ExitCode.OK, terminal
    assert out.strip() == "deleted deployment 55: 1 events"
    assert await history(stub, 55) == []


# --------------------------------------------------------------------------- export, import


async def test_export_import_round_trip_into_another_deployment(
    server: Any, stub: Any, tmp_path: Path
) -> None:
    messages = ["plain", 'quotes " and \\ backslash', "ünïcödé\nsecond line", ""]
    for event_id, message in enumerate(messages, start=1):
        await create(stub, 61, event_id, message)
    exported = await run_cli("export", "--deployment", "61", "--json", *connect(server))
    assert exported.code == ExitCode.OK, exported.err
    assert len(exported.out_lines) == len(messages)
    assert "exported 4 events" in exported.err
    path = tmp_path / "events.jsonl"
    path.write_text(exported.out)

    result = await run_cli("import", str(path), "--deployment", "62", *connect(server))
    assert result.code == ExitCode.OK, result.err
    assert result.out.strip() == f"{path}: 4 created, 0 duplicates, 0 conflicts, 0 invalid"
    assert "\r" not in result.err  # no progress bar when stderr is a pipe
    assert "%" not in result.err

    source, copy = await history(stub, 61), await history(stub, 62)
    assert [(e.id, e.message, e.timestamp.send) for e in copy] == [
        (e.id, e.message, e.timestamp.send) for e in source
    ]
    assert {e.deployment_id for e in copy} == {62}

    # idempotent: the same file again stores nothing new, and says so
    result = await run_cli("import", str(path), "--deployment", "62", *connect(server))
    assert result.code == ExitCode.OK
    assert "0 created, 4 duplicates" in result.out
    assert len(await history(stub, 62)) == 4

    # --after resumes after a cursor of the exported file
    first_cursor = json.loads(exported.out_lines[0])["cursor"]
    resumed = await run_cli(
        "export", "--deployment", "61", "--after", first_cursor, *connect(server)
    )
    assert resumed.out_lines == exported.out_lines[1:]


async def test_import_from_stdin_in_batches(server: Any, stub: Any) -> None:
    lines = [
        json.dumps({"id": n, "deployment_id": 63, "message": f"event {n}"}) for n in range(1, 251)
    ]
    data = ("\n".join(lines) + "\n").encode()
    result = await run_cli(
        "import", "-", "--batch-size", "100", "--json", *connect(server), stdin=data
    )
    assert result.code == ExitCode.OK, result.err
    summary = json.loads(result.out)
    assert (summary["created"], summary["duplicates"]) == (250, 0)
    stored = await history(stub, 63)
    assert [e.id for e in stored] == list(range(1, 251))


async def test_import_reports_rejected_lines(server: Any, stub: Any, tmp_path: Path) -> None:
    await create(stub, 64, 1, "original")
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"id": 1, "deployment_id": 64, "message": "different"}',  # 1: conflict
                '{"id": 2, "deployment_id": 64, "message": "fine"}',  # 2: created
                "",  # 3: blank, skipped
                "{not json",  # 4: invalid (client side)
                '{"id": 3, "deployment_id": 0, "message": "no deployment"}',  # 5: invalid (server)
                '{"id": 1, "deployment_id": 64, "message": "original"}',  # 6: duplicate
            ]
        )
        + "\n"
    )
    result = await run_cli("import", str(path), *connect(server))
    assert result.code == ExitCode.FAILED
    assert result.out.strip() == (
        f"{path}: 1 created, 1 duplicates, 1 conflicts, 2 invalid; "
        "conflicts at lines 1; invalid at lines 4, 5"
    )
    assert "line 1: conflict:" in result.err
    assert "line 5: invalid: deployment_id" in result.err
    assert "Traceback" not in result.err

    result = await run_cli("import", str(path), "--json", *connect(server))
    summary = json.loads(result.out)
    assert [item["line"] for item in summary["invalid"]] == [4, 5]
    assert [item["line"] for item in summary["conflicts"]] == [1]


async def test_import_shows_a_progress_bar_on_a_terminal(server: Any, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": n, "deployment_id": 65, "message": "m"}) + "\n" for n in range(1, 51)
        )
    )
    code, out, terminal = await run_cli_with_tty("import", str(path), *connect(server))
    assert code == ExitCode.OK, terminal
    assert "\rimport [" in terminal
    assert "100% 50 events" in terminal
    assert out.strip().endswith("50 created, 0 duplicates, 0 conflicts, 0 invalid")

    code, out, terminal = await run_cli_with_tty(
        "import", str(path), "--no-progress", *connect(server)
    )
    assert code == ExitCode.OK
    assert "import [" not in terminal
    assert "0 created, 50 duplicates" in out


async def test_import_of_a_missing_file_exits_2(server: Any, tmp_path: Path) -> None:
    result = await run_cli("import", str(tmp_path / "nope.jsonl"), *connect(server))
    assert result.code == ExitCode.USAGE
    assert "cannot read" in assert_one_error_line(result)


@pytest.mark.parametrize(
    "command",
    [["deployments"], ["delete", "--deployment", "1", "--yes"], ["export", "--deployment", "1"]],
)
async def test_admin_commands_exit_3_when_unreachable(command: list[str]) -> None:
    result = await run_cli(*command, "-port", str(free_port()), "--timeout", "1")
    assert result.code == ExitCode.UNAVAILABLE
    assert assert_one_error_line(result).startswith("error: cannot reach the server")


#: Number of the read(2) system call, by machine.
READ_SYSCALL = {"x86_64": 0, "aarch64": 63}


def blocked_reading_stdin(pid: int) -> bool:
    """Whether the process's main thread sits in read(0, ...): start-up is over."""
    number = READ_SYSCALL.get(platform.machine())
    if number is None:
        pytest.skip("read(2) number unknown on this machine")
    fields = Path(f"/proc/{pid}/syscall").read_text().split()
    return len(fields) > 1 and fields[0] == str(number) and int(fields[1], 16) == 0


async def test_ctrl_c_outside_follow_exits_130(server: Any) -> None:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "import",
        "-",
        *connect(server),
        stdin=subprocess.PIPE,  # kept open: the import waits for input
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    assert process.stderr is not None
    try:
        for _ in range(400):
            if blocked_reading_stdin(process.pid):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the import never started reading standard input")
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 10)
        err = (await asyncio.wait_for(process.stderr.read(), 5)).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == ExitCode.INTERRUPTED
    assert err.strip() == "error: interrupted"


async def test_export_into_a_closed_pipe_exits_141_quietly(server: Any, stub: Any) -> None:
    request = pb.CreateEventsRequest(
        events=[pb.EventRequest(id=n, deployment_id=66, message="m" * 500) for n in range(1, 1001)]
    )
    await stub.CreateEvents(request, timeout=30)
    read_end, write_end = os.pipe()
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "export",
        "--deployment",
        "66",
        *connect(server),
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    os.close(write_end)
    try:
        first = await asyncio.wait_for(asyncio.to_thread(os.read, read_end, 100), 10)
        assert first.startswith(b'{"id":1')
        os.close(read_end)
        read_end = -1
        code = await asyncio.wait_for(process.wait(), 20)
        assert process.stderr is not None
        err = (await asyncio.wait_for(process.stderr.read(), 5)).decode()
    finally:
        if read_end >= 0:
            os.close(read_end)
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == ExitCode.BROKEN_PIPE
    assert err == ""


async def test_deployments_pages_through_every_deployment(server: Any, stub: Any) -> None:
    count = 600  # more than one ListDeployments page of the client (500)
    request = pb.CreateEventsRequest(
        events=[pb.EventRequest(id=1, deployment_id=d, message="m") for d in range(1, count + 1)]
    )
    await stub.CreateEvents(request, timeout=30)
    result = await run_cli("deployments", "--json", *connect(server))
    assert result.code == ExitCode.OK, result.err
    assert [json.loads(line)["id"] for line in result.out_lines] == list(range(1, count + 1))


async def test_follow_ends_with_exit_0_when_the_server_stops(
    app_factory: Any, stub_for: Any
) -> None:
    app = await app_factory()
    created = await create(stub_for(app), 71, 1, "before the stop")
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "-deployment",
        "71",
        "--follow",
        *connect(app),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    assert process.stderr is not None
    try:
        for _ in range(2):  # the history event, then "Caught up"
            await asyncio.wait_for(process.stderr.readline(), 10)
        await app.stop()
        code = await asyncio.wait_for(process.wait(), 15)
        rest = (await asyncio.wait_for(process.stderr.read(), 5)).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == ExitCode.OK, rest
    assert f"The server ended the stream; resume with --after {created.cursor}" in rest


async def test_redis_down_health_exits_1_and_calls_exit_3(server: Any, redis_server: Any) -> None:
    redis_server.stop()
    result = Result(-1, "", "")
    for _ in range(40):  # health turns NOT_SERVING within ~2 s of losing Redis
        result = await run_cli("health", *connect(server))
        if result.out.strip() == "NOT_SERVING":
            break
        await asyncio.sleep(0.25)
    assert result.out.strip() == "NOT_SERVING"
    assert result.code == ExitCode.FAILED

    result = await run_cli("-add", '{"id":1,"deployment_id":1,"message":"m"}', *connect(server))
    assert result.code == ExitCode.UNAVAILABLE  # the server is there, its store is not: retry
    assert "UNAVAILABLE" in assert_one_error_line(result)


# --------------------------------------------------------------------------- tokens and TLS

READER_TOKEN = "reader-token-0123456789abcdef"
WRITER_TOKEN = "writer-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


def write_tokens(directory: Path) -> Path:
    path = directory / "tokens"
    path.write_text(
        f"reader {READER_TOKEN} dashboard\nwriter {WRITER_TOKEN} pipeline\nadmin {ADMIN_TOKEN}\n"
    )
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA with server and client certificates, and a stranger CA."""
    ca = Authority(tmp_path / "ca", "test-ca")
    stranger = Authority(tmp_path / "stranger", "stranger-ca")
    server_cert, server_key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    return {
        "ca": ca.cert_file,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "stranger_ca": stranger.cert_file,
    }


def test_security_flags_may_precede_the_command() -> None:
    assert split_command(["--tls", "health"]) == ("health", ["--tls"])
    assert split_command(["--cacert", "ca.pem", "--token-file=t", "deployments", "--json"]) == (
        "deployments",
        ["--json", "--cacert", "ca.pem", "--token-file=t"],
    )


def test_options_read_files_and_never_show_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {READER_TOKEN}  \nignored second line\n")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"PEM")
    args = deployments_parser().parse_args(["--token-file", str(token_file), "--cacert", str(ca)])
    options = options_from_args(args, environ={})
    assert options.token == READER_TOKEN
    assert options.secure and options.root_certificates == b"PEM"
    assert READER_TOKEN not in repr(options)
    # --token wins over nothing, the environment is the fallback, --tls alone uses system roots.
    env_options = options_from_args(
        deployments_parser().parse_args(["--tls"]), environ={"ACTIVITY_TOKEN": WRITER_TOKEN}
    )
    assert env_options.token == WRITER_TOKEN and env_options.secure
    assert env_options.root_certificates is None
    plain = options_from_args(deployments_parser().parse_args([]), environ={"ACTIVITY_TLS": "1"})
    assert plain.secure and plain.token == ""
    connection = Connection(env_options)
    try:
        assert ("authorization", f"Bearer {WRITER_TOKEN}") in connection.metadata()
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--cert", "c.pem"], "--cert and --key go together"),
        (["--key", "k.pem"], "--cert and --key go together"),
        (["--cacert", "/no/such/ca.pem"], "cannot read --cacert /no/such/ca.pem: No such file"),
        (["--token", "x" * 20, "--token-file", "/etc/hostname"], "--token or --token-file"),
        (["--token-file", "/no/such/token"], "cannot read --token-file"),
        (["--token", "two words"], "spaces or non-printable"),
    ],
)
async def test_bad_security_flags_exit_2(args: list[str], fragment: str) -> None:
    for command in (["deployments"], ["health"], ["-deployment", "1"]):
        result = await run_cli(*command, *args, "--port", "1")
        assert result.code == ExitCode.USAGE, (command, result.err)
        line = assert_one_error_line(result)
        assert fragment in line
        assert "two words" not in line


async def test_tokens_are_sent_and_refusals_exit_77(app_factory: Any, tmp_path: Path) -> None:
    app = await app_factory(auth_tokens_file=write_tokens(tmp_path))
    port = ["--port", str(app.port)]
    event = '{"id": 1, "deployment_id": 5, "message": "with a token"}'

    missing = await run_cli("-add", event, *port)
    assert missing.code == ExitCode.NOT_ALLOWED
    assert "UNAUTHENTICATED" in assert_one_error_line(missing)

    unknown_token = "not-a-known-token-at-all-1234"
    unknown = await run_cli("deployments", *port, "--token", unknown_token)
    assert unknown.code == ExitCode.NOT_ALLOWED
    line = assert_one_error_line(unknown)
    assert "UNAUTHENTICATED" in line and "unknown bearer token" in line
    assert unknown_token not in unknown.err + unknown.out

    added = await run_cli("-add", event, *port, env={"ACTIVITY_TOKEN": WRITER_TOKEN})
    assert added.code == ExitCode.OK, added.err
    assert CREATED.match(added.err_lines[0])

    wrong_role = await run_cli("deployments", *port, env={"ACTIVITY_TOKEN": WRITER_TOKEN})
    assert wrong_role.code == ExitCode.NOT_ALLOWED
    assert "PERMISSION_DENIED" in assert_one_error_line(wrong_role)
    assert WRITER_TOKEN not in wrong_role.err

    token_file = tmp_path / "reader-token"
    token_file.write_text(READER_TOKEN + "\n")
    listed = await run_cli("deployments", "--json", *port, "--token-file", str(token_file))
    assert listed.code == ExitCode.OK, listed.err
    assert [json.loads(line)["id"] for line in listed.out_lines] == [5]
    watched = await run_cli("-deployment", "5", "--json", *port, "-token", READER_TOKEN)
    assert watched.code == ExitCode.OK, watched.err
    assert json.loads(watched.out_lines[0])["message"] == "with a token"

    denied = await run_cli("delete", "--deployment", "5", "--yes", *port, "--token", READER_TOKEN)
    assert denied.code == ExitCode.NOT_ALLOWED
    assert "DeleteDeployment needs role admin" in assert_one_error_line(denied)
    deleted = await run_cli("delete", "--deployment", "5", "--yes", *port, "--token", ADMIN_TOKEN)
    assert deleted.code == ExitCode.OK, deleted.err

    # Health is open: probes carry no token.
    health = await run_cli("health", *port)
    assert (health.code, health.out.strip()) == (ExitCode.OK, "SERVING")


async def test_tls_with_a_ca_bundle(app_factory: Any, pki: dict[str, Path]) -> None:
    app = await app_factory(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"])
    port = ["--port", str(app.port)]
    trusted = ["--cacert", str(pki["ca"])]

    for address in (["--address", "localhost"], ["--address", "127.0.0.1"]):
        health = await run_cli("health", *address, *port, *trusted)
        assert (health.code, health.out.strip()) == (ExitCode.OK, "SERVING"), health.err
    renamed = await run_cli("health", *port, *trusted, "--address", "127.0.0.1",
                            "--server-name", "localhost")  # fmt: skip
    assert renamed.code == ExitCode.OK, renamed.err

    event = '{"id": 1, "deployment_id": 8, "message": "over tls"}'
    added = await run_cli("-add", event, *port, "--address", "localhost", *trusted)
    assert added.code == ExitCode.OK, added.err
    exported = await run_cli("export", "--deployment", "8", *port, *trusted)
    assert json.loads(exported.out_lines[0])["message"] == "over tls"

    # Plaintext against a TLS port, an untrusted CA, a name the certificate lacks:
    # the handshake fails, which looks like an unreachable server, with a hint.
    plaintext = await run_cli("deployments", *port, "--timeout", "1")
    assert plaintext.code == ExitCode.UNAVAILABLE
    assert "add --tls or --cacert" in assert_one_error_line(plaintext)
    for bad in (
        ["--cacert", str(pki["stranger_ca"])],
        ["--tls"],  # system roots do not know the test CA
        [*trusted, "--server-name", "elsewhere.example"],
    ):
        refused = await run_cli("deployments", *port, "--timeout", "1", *bad)
        assert refused.code == ExitCode.UNAVAILABLE, bad
        assert "TLS handshake failed?" in assert_one_error_line(refused)
    health = await run_cli("health", *port, "--timeout", "1")
    assert health.code == ExitCode.FAILED


async def test_mutual_tls_and_token_together(
    app_factory: Any, pki: dict[str, Path], tmp_path: Path
) -> None:
    app = await app_factory(
        tls_cert_file=pki["server_cert"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["ca"],
        auth_tokens_file=write_tokens(tmp_path),
    )
    port = ["--port", str(app.port), "--address", "localhost", "--cacert", str(pki["ca"])]
    client = ["--cert", str(pki["client_cert"]), "--key", str(pki["client_key"])]

    health = await run_cli("health", *port, *client)
    assert (health.code, health.out.strip()) == (ExitCode.OK, "SERVING"), health.err
    no_client_cert = await run_cli("health", *port, "--timeout", "1")
    assert no_client_cert.code == ExitCode.FAILED

    event = '{"id": 3, "deployment_id": 9, "message": "mutual"}'
    added = await run_cli("-add", event, *port, *client, env={"ACTIVITY_TOKEN": WRITER_TOKEN})
    assert added.code == ExitCode.OK, added.err
    no_token = await run_cli("deployments", *port, *client)
    assert no_token.code == ExitCode.NOT_ALLOWED
    listed = await run_cli("deployments", "--json", *port, *client, "--token", READER_TOKEN)
    assert listed.code == ExitCode.OK, listed.err
    assert json.loads(listed.out_lines[0])["last_event"]["event"]["message"] == "mutual"
