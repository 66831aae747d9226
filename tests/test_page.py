"""The activity page: its HTTP API and live streams, and the pages in a real headless browser.

Everything runs against a real server on a private redis-server; events are
created through gRPC, as users create them. Browser tests drive Debian's
``chromium`` with Playwright (never a downloaded browser); outside CI a missing
chromium or Playwright skips them, in CI it fails. Screenshots of each page go
to ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from activity_events.http import feeds
from activity_events.http.page import ActivityPage, start_page
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

#: Deadline of one HTTP exchange or SSE read in these tests.
TIMEOUT = 10.0
#: How fast a live event must show on an open page (the issue's promise).
LIVE_SECONDS = 2.0

READER = "page-reader-token-0123456789"
WRITER = "page-writer-token-0123456789"


# --------------------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> Reply:
    """One GET on its own connection (the side port closes after each answer)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split(" ")[1]), parsed, body)


class EventStream:
    """A raw Server-Sent Events client: reads messages as dicts (id, event, data)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    async def open(
        cls,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        receive_buffer: int = 0,
    ) -> EventStream:
        """``receive_buffer`` fixes the socket's receive buffer (no autotuning), so a
        browser that stops reading fills it after that many bytes on any machine."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), TIMEOUT
            )
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        stream = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status_line, *header_lines = head.decode("latin-1").strip().split("\r\n")
        stream.status = int(status_line.split(" ")[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            stream.headers[name.strip().lower()] = value.strip()
        return stream

    async def message(self) -> dict[str, Any]:
        """The next message with data (comments and retry lines are skipped)."""
        while True:
            block = await asyncio.wait_for(self.reader.readuntil(b"\n\n"), TIMEOUT)
            fields: dict[str, Any] = {}
            for line in block.decode().splitlines():
                name, _, value = line.partition(": ")
                if name in {"id", "event", "data"}:
                    fields[name] = value
            if "data" in fields:
                fields["data"] = json.loads(fields["data"])
                return fields

    async def events(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` messages named "event"."""
        out: list[dict[str, Any]] = []
        for _ in range(count * 3 + 5):
            message = await self.message()
            if message.get("event") == "event":
                out.append(message)
                if len(out) == count:
                    return out
        raise AssertionError(f"only {len(out)} of {count} events arrived")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def create(stub: Any, deployment: int, event_id: int, message: str) -> pb.EventResponse:
    request = pb.EventRequest(id=event_id, deployment_id=deployment, message=message)
    request.timestamp.send = time.time_ns()
    response: pb.EventResponse = await stub.CreateEvent(request, timeout=TIMEOUT)
    assert response.success
    return response


@dataclass
class PageServer:
    app: Any
    page: ActivityPage
    port: int
    stub: Any
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def create(self, deployment: int, event_id: int, message: str) -> pb.EventResponse:
        request = pb.EventRequest(id=event_id, deployment_id=deployment, message=message)
        request.timestamp.send = time.time_ns()
        response: pb.EventResponse = await self.stub.CreateEvent(
            request, timeout=TIMEOUT, metadata=self.metadata
        )
        assert response.success and not response.duplicate
        return response


PageFactory = Callable[..., Awaitable[PageServer]]


@pytest.fixture
async def page_factory(app_factory: Any, channel_factory: Any) -> AsyncIterator[PageFactory]:
    """Start a server with the activity page (the server stops it)."""

    async def build(**overrides: Any) -> PageServer:
        app = await app_factory(**overrides)
        page = app.page
        assert page is not None, "the server starts the page itself (page_enabled)"
        stub = pb_grpc.ActivityEventsStub(channel_factory(app.port))  # type: ignore[no-untyped-call]
        metadata = (("authorization", f"Bearer {WRITER}"),) if app.settings.auth_tokens_file else ()
        return PageServer(app, page, page.port or app.metrics_port, stub, metadata)

    yield build


# --------------------------------------------------------------------------- HTTP API


async def test_api_lists_deployments_and_pages_events(page_factory: PageFactory) -> None:
    server = await page_factory()
    for deployment, event_id in [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)]:
        await server.create(deployment, event_id, f"d{deployment} e{event_id}")

    listing = await http_get(server.port, "/api/deployments")
    assert listing.status == 200
    assert listing.headers["cache-control"] == "no-store"
    rows = listing.json()["deployments"]
    assert [row["id"] for row in rows] == [2, 1, 3]  # newest activity first
    assert [row["event_count"] for row in rows] == [2, 2, 1]
    assert rows[0]["last"]["message"] == "d2 e2"
    assert listing.json()["total"] == 3

    one = await http_get(server.port, "/api/deployments/3")
    assert one.json()["last"]["message"] == "d3 e1"
    assert (await http_get(server.port, "/api/deployments/99")).status == 404

    for event_id in range(3, 8):
        await server.create(1, event_id, f"d1 e{event_id}")
    first = (await http_get(server.port, "/api/deployments/1/events?limit=4")).json()
    assert [e["id"] for e in first["events"]] == [7, 6, 5, 4]
    second = (
        await http_get(server.port, f"/api/deployments/1/events?limit=4&before={first['older']}")
    ).json()
    assert [e["id"] for e in second["events"]] == [3, 2, 1]
    assert second["older"] is None  # the oldest event is shown
    assert int(second["events"][0]["receive"]) > 0

    bad = await http_get(server.port, "/api/deployments/1/events?before=nonsense")
    assert bad.status == 400 and "before" in bad.json()["error"]
    assert (await http_get(server.port, "/api/deployments/1/events?limit=0")).status == 400

    html = await http_get(server.port, "/")
    assert html.status == 200 and html.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in html.headers["content-security-policy"]
    assert (await http_get(server.port, "/deployments/1")).status == 200
    script = await http_get(server.port, "/static/common.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert (await http_get(server.port, "/static/../settings.py")).status == 404
    metrics = await http_get(server.port, "/metrics")  # the side port still serves metrics
    assert metrics.status == 200 and b"grpc_server_handled_total" in metrics.body


async def test_stream_resumes_after_last_event_id_without_gap_or_repeat(
    page_factory: PageFactory,
) -> None:
    server = await page_factory()
    for event_id in (1, 2):
        await server.create(5, event_id, f"before {event_id}")
    stream = await EventStream.open(server.port, "/api/deployments/5/stream?after=0-0")
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        history = await stream.events(2)
        assert [m["data"]["message"] for m in history] == ["before 1", "before 2"]
        assert all(m["id"] == m["data"]["cursor"] for m in history)
        live = (await stream.message())["event"]
        assert live == "live"
        await server.create(5, 3, "live 3")
        (third,) = await stream.events(1)
        assert third["data"]["message"] == "live 3"
    finally:
        await stream.close()

    # Disconnected: events 4 and 5 happen; the browser comes back with Last-Event-ID.
    await server.create(5, 4, "missed 4")
    await server.create(5, 5, "missed 5")
    resumed = await EventStream.open(
        server.port, "/api/deployments/5/stream?after=0-0", {"Last-Event-ID": third["id"]}
    )
    try:
        caught_up = await resumed.events(2)
        assert [m["data"]["id"] for m in caught_up] == [4, 5]
        assert (await resumed.message())["event"] == "live"
        await server.create(5, 6, "live 6")
        (sixth,) = await resumed.events(1)
        assert sixth["data"]["id"] == 6
    finally:
        await resumed.close()

    assert (await http_get(server.port, "/api/deployments/5/stream")).status == 400
    other = await http_get(server.port, "/api/deployments/5/stream?after=6:1-0")
    assert other.status == 400


async def test_list_stream_starts_with_a_snapshot_then_every_new_event(
    page_factory: PageFactory,
) -> None:
    server = await page_factory()
    await server.create(1, 1, "one")
    stream = await EventStream.open(server.port, "/api/stream")
    try:
        snapshot = await stream.message()
        assert snapshot["event"] == "snapshot"
        assert [row["id"] for row in snapshot["data"]["deployments"]] == [1]
        await server.create(2, 1, "two")
        (event,) = await stream.events(1)
        assert (event["data"]["deployment_id"], event["data"]["message"]) == (2, "two")
    finally:
        await stream.close()


async def test_live_streams_are_bounded_and_end_when_dropped(page_factory: PageFactory) -> None:
    server = await page_factory(max_page_streams=1)
    first = await EventStream.open(server.port, "/api/deployments/1/stream?after=0-0")
    try:
        assert first.status == 200
        assert (await first.message())["event"] == "live"
        refused = await http_get(server.port, "/api/deployments/1/stream?after=0-0")
        assert refused.status == 503
        assert refused.headers["retry-after"] == "2"
        assert "max_page_streams=1" in refused.json()["error"]
        assert server.page.drop_streams() == 1
        assert await asyncio.wait_for(first.reader.read(), TIMEOUT) == b""  # closed server-side
    finally:
        await first.close()
    deadline = time.monotonic() + TIMEOUT
    while server.page.stream_count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    again = await EventStream.open(server.port, "/api/deployments/1/stream?after=0-0")
    try:
        assert again.status == 200  # the slot was given back
    finally:
        await again.close()


async def test_a_stream_that_falls_behind_ends_and_resumes_without_gap(
    page_factory: PageFactory,
) -> None:
    """Like a gRPC follower, a stream that falls further behind than the hub keeps is
    ended, never left to grow; the browser's reconnect with Last-Event-ID then reads
    the rest from history. The browser here stops reading until its socket is full: its
    receive buffer is fixed small, and the 12 MB sent exceed what the server's socket
    can hold however far the kernel grows it."""
    server = await page_factory(follower_queue=2)
    stream = await EventStream.open(
        server.port, "/api/deployments/6/stream?after=0-0", receive_buffer=16 * 1024
    )
    big = "x" * 60_000
    received: list[dict[str, Any]] = []
    try:
        assert (await stream.message())["event"] == "live"
        for batch in range(10):  # ten appends, each its own chunk of the hub's log
            events = [
                pb.EventRequest(id=batch * 20 + n, deployment_id=6, message=f"{n} {big}")
                for n in range(1, 21)
            ]
            await server.stub.CreateEvents(pb.CreateEventsRequest(events=events), timeout=TIMEOUT)
            await asyncio.sleep(0.05)
        with contextlib.suppress(asyncio.IncompleteReadError):
            while len(received) < 200:
                message = await stream.message()
                if message.get("event") == "event":
                    received.append(message)
    finally:
        await stream.close()
    assert len(received) < 200  # the stream that fell behind was ended
    resumed = await EventStream.open(
        server.port,
        "/api/deployments/6/stream?after=0-0",
        {"Last-Event-ID": received[-1]["id"] if received else "0-0"},
    )
    try:
        rest = await resumed.events(200 - len(received))
    finally:
        await resumed.close()
    ids = [m["data"]["id"] for m in received + rest]
    assert ids == list(range(1, 201))


async def test_a_browser_too_far_behind_is_told_to_reset(
    page_factory: PageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feeds, "CATCH_UP_MAX", 3)
    server = await page_factory()
    first = await server.create(7, 1, "seen")
    for event_id in range(2, 7):
        await server.create(7, event_id, f"missed {event_id}")
    stream = await EventStream.open(
        server.port, "/api/deployments/7/stream", {"Last-Event-ID": first.cursor}
    )
    try:
        message = await stream.message()
        assert message["event"] == "reset"
        assert await asyncio.wait_for(stream.reader.read(), TIMEOUT) == b""
    finally:
        await stream.close()


async def test_api_needs_a_reader_token_when_auth_is_on(
    page_factory: PageFactory, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"reader {READER} page\nwriter {WRITER} pipeline\n")
    server = await page_factory(auth_tokens_file=tokens)
    await server.create(4, 1, "secret plans")

    assert (await http_get(server.port, "/")).status == 200  # the HTML holds no data
    missing = await http_get(server.port, "/api/deployments")
    assert (missing.status, missing.json()["error"]) == (401, "missing bearer token")
    unknown = await http_get(server.port, "/api/deployments?access_token=not-a-token-at-all")
    assert (unknown.status, unknown.json()["error"]) == (401, "unknown bearer token")
    wrong_role = await http_get(
        server.port, "/api/deployments", {"Authorization": f"Bearer {WRITER}"}
    )
    assert wrong_role.status == 403
    assert b"secret plans" not in missing.body + unknown.body + wrong_role.body

    allowed = await http_get(server.port, "/api/deployments", {"Authorization": f"Bearer {READER}"})
    assert allowed.json()["deployments"][0]["last"]["message"] == "secret plans"
    stream = await EventStream.open(
        server.port, f"/api/deployments/4/stream?after=0-0&access_token={READER}"
    )
    try:
        assert stream.status == 200
        (event,) = await stream.events(1)
        assert event["data"]["message"] == "secret plans"
    finally:
        await stream.close()


async def test_page_can_be_off_or_on_its_own_port(page_factory: PageFactory) -> None:
    own = await page_factory(page_port=0)
    assert own.page.port is not None and own.port != own.app.metrics_port
    assert (await http_get(own.port, "/")).status == 200
    assert (await http_get(own.app.metrics_port, "/")).status == 404
    assert (await http_get(own.app.metrics_port, "/metrics")).status == 200
    assert (await http_get(own.port, "/metrics")).status == 404

    settings = own.app.settings.model_copy(update={"page_enabled": False})
    started = await start_page(
        settings,
        own.app.store,
        own.app.hub,
        own.app.http,
        admission=own.app.admission,
        authenticator=None,
    )
    assert started is None


# --------------------------------------------------------------------------- browser


def _browser_available() -> None:
    problem = None
    if not Path(CHROMIUM).exists():
        problem = f"{CHROMIUM} is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401, PLC0415
        except ImportError:
            problem = "playwright is not installed (pip install playwright)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Debian chromium through Playwright; nothing is downloaded."""
    _browser_available()
    from playwright.async_api import async_playwright  # noqa: PLC0415

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def tab(browser: Any) -> AsyncIterator[Any]:
    """A fresh page (own context: own sessionStorage) that fails on script errors."""
    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    opened = await context.new_page()
    opened.set_default_timeout(TIMEOUT * 1000)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        await context.close()
    assert not errors, f"script errors on the page: {errors}"


async def screenshot(tab: Any, name: str, *, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


async def rows_of(tab: Any) -> list[str]:
    """Cursors of the event rows on a deployment page, top to bottom."""
    cursors: list[str] = await tab.eval_on_selector_all(
        "#events tbody tr", "rows => rows.map(r => r.dataset.cursor)"
    )
    return cursors


async def wait_live(tab: Any) -> None:
    await tab.wait_for_selector("#status[data-state='live']")


async def test_list_page_shows_deployments_and_moves_active_ones_up(
    page_factory: PageFactory, tab: Any
) -> None:
    server = await page_factory()
    await server.create(11, 1, "Deployment has been created successfully")
    await server.create(12, 1, "Rolling out version 2.4.1 to 3 replicas")
    await server.create(12, 2, "Replica 1 of 3 is healthy")
    await server.create(13, 1, "Waiting for approval")

    await tab.goto(server.url + "/")
    await wait_live(tab)
    order = await tab.eval_on_selector_all(
        "#deployments tbody tr", "rows => rows.map(r => r.dataset.deployment)"
    )
    assert order == ["13", "12", "11"]
    row = tab.locator("#deployments tbody tr[data-deployment='12']")
    assert await row.locator("td").nth(1).text_content() == "2"
    assert await row.locator("td.message").text_content() == "Replica 1 of 3 is healthy"
    exact = await row.locator("time").get_attribute("title")
    assert exact is not None and " ns since the epoch" in exact

    started = time.monotonic()
    await server.create(11, 2, "Deployment finished")
    await tab.wait_for_function(
        "() => document.querySelector('#deployments tbody tr').dataset.deployment === '11'",
        timeout=LIVE_SECONDS * 1000,
    )
    assert time.monotonic() - started < LIVE_SECONDS
    first = tab.locator("#deployments tbody tr").first
    assert await first.locator("td").nth(1).text_content() == "2"
    await server.create(14, 1, "A brand new deployment")
    await tab.wait_for_selector("#deployments tbody tr[data-deployment='14']")
    await tab.wait_for_timeout(300)  # the highlight fades; the screenshot shows the rows
    await screenshot(tab, "list-page")

    # Keyboard: the first link is reachable with Tab after the skip link and the brand.
    await tab.keyboard.press("Tab")
    assert await tab.evaluate("document.activeElement.textContent") == "Skip to content"


async def test_deployment_page_shows_history_and_live_events_within_2s(
    page_factory: PageFactory, tab: Any
) -> None:
    server = await page_factory()
    for event_id in range(1, 61):
        await server.create(21, event_id, f"step {event_id} done")

    await tab.goto(server.url + "/deployments/21")
    await wait_live(tab)
    rows = await rows_of(tab)
    assert len(rows) == 50  # the newest page
    first_message = await tab.locator("#events tbody tr td.message").first.text_content()
    assert first_message == "step 60 done"

    await tab.get_by_role("button", name="Load older events").click()
    await tab.wait_for_function("() => document.querySelectorAll('#events tbody tr').length === 60")
    assert await tab.locator("#older").is_hidden()  # nothing older left
    all_rows = await rows_of(tab)
    assert len(set(all_rows)) == 60

    for event_id in (61, 62):
        started = time.monotonic()
        response = await server.create(21, event_id, f"live {event_id}")
        assert response.id == event_id
        await tab.wait_for_function(
            f"() => document.querySelector('#events tbody td.message')"
            f".textContent === 'live {event_id}'",
            timeout=LIVE_SECONDS * 1000,
        )
        assert time.monotonic() - started < LIVE_SECONDS
    assert await tab.locator("#summary").text_content() == "62 events; showing 62."
    await tab.set_viewport_size({"width": 1100, "height": 700})
    await screenshot(tab, "deployment-page")
    await tab.set_viewport_size({"width": 390, "height": 844})  # a phone
    await tab.evaluate("window.scrollTo(0, 0)")
    await screenshot(tab, "deployment-page-phone", full_page=False)


async def test_dropped_stream_reconnects_without_duplicate_or_missing_rows(
    page_factory: PageFactory, tab: Any
) -> None:
    server = await page_factory()
    for event_id in range(1, 4):
        await server.create(31, event_id, f"before {event_id}")
    await tab.goto(server.url + "/deployments/31")
    await wait_live(tab)

    next_id = 4
    for _ in range(3):  # drop the stream three times, creating events while it is down
        assert server.page.drop_streams() >= 1
        for _ in range(3):
            await server.create(31, next_id, f"during outage {next_id}")
            next_id += 1
        await server.create(31, next_id, f"after {next_id}")
        await tab.wait_for_function(
            f"() => document.querySelectorAll('#events tbody tr').length === {next_id}",
            timeout=TIMEOUT * 1000,
        )
        await wait_live(tab)
        next_id += 1

    stored = [
        stored.cursor
        async for response in server.stub.WatchEvents(
            pb.WatchEventsRequest(deployment_id=31), timeout=TIMEOUT
        )
        for stored in response.events
    ]
    shown = await rows_of(tab)
    assert shown == list(reversed(stored))  # every event once, newest first
    messages = await tab.eval_on_selector_all(
        "#events tbody td.message", "cells => cells.map(c => c.textContent)"
    )
    assert len(messages) == len(set(messages)) == next_id - 1


async def test_malicious_messages_are_shown_as_text(page_factory: PageFactory, tab: Any) -> None:
    server = await page_factory()
    script = "<script>window.__pwned = 'script'</script>"
    image = "<img src=x onerror=\"window.__pwned = 'img'\">"
    await server.create(41, 1, script)
    await tab.goto(server.url + "/deployments/41")
    await wait_live(tab)
    await server.create(41, 2, image)  # arrives live, through the stream
    await tab.wait_for_function("() => document.querySelectorAll('#events tbody tr').length === 2")

    cells = await tab.eval_on_selector_all(
        "#events tbody td.message", "cells => cells.map(c => c.textContent)"
    )
    assert cells == [image, script]
    assert await tab.locator("#events tbody img, #events tbody script").count() == 0
    assert await tab.evaluate("window.__pwned === undefined")

    await tab.goto(server.url + "/")
    await wait_live(tab)
    assert await tab.locator("#deployments td.message").text_content() == image
    assert await tab.locator("#deployments tbody img").count() == 0
    assert await tab.evaluate("window.__pwned === undefined")
    await screenshot(tab, "malicious-message")


async def test_browser_signs_in_with_a_reader_token(
    page_factory: PageFactory, tab: Any, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"reader {READER} page\nwriter {WRITER} pipeline\n")
    server = await page_factory(auth_tokens_file=tokens)
    await server.create(51, 1, "behind a token")

    await tab.goto(server.url + "/deployments/51")
    await tab.wait_for_selector("#login:not([hidden])")
    assert await tab.locator("#events tbody tr").count() == 0
    await screenshot(tab, "sign-in")
    await tab.get_by_label("Reader token").fill(WRITER)  # valid, but not a reader
    await tab.keyboard.press("Enter")
    await tab.wait_for_function(
        "() => document.getElementById('login-error').textContent.includes('refused')"
    )
    await tab.get_by_label("Reader token").fill(READER)
    await tab.keyboard.press("Enter")
    await wait_live(tab)
    assert await tab.locator("#events td.message").text_content() == "behind a token"
    await server.create(51, 2, "live behind a token")  # the stream carries the token too
    await tab.wait_for_function("() => document.querySelectorAll('#events tbody tr').length === 2")
