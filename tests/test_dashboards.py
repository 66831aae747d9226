"""Dashboard and alert rules, checked by the real tools against the real service.

- ``promtool test rules``: every alert fires and stays quiet in its unit tests.
- ``tsc`` with ``@grafana/schema``: the dashboard JSON has the published shape.
- A real Prometheus (Debian's binary, started here on a free loopback port)
  scrapes a real running service after some traffic (a follower, and a
  subscription whose consumer acknowledges all but one event, which is
  redelivered and dead-lettered); every PromQL expression of the dashboard
  and of the rules is evaluated through its HTTP API and none may error; the
  core and subscription panels return data; every metric the dashboard names
  is in the scrape; ``promtool check metrics`` finds nothing to say.

The tools come from .ci/run (``apt-get install prometheus``, ``npm ci`` in
dashboards/). Outside CI a missing tool skips its test; in CI it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc
from tests.support.ports import free_port

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
DASHBOARD = DASHBOARDS / "activity-events.json"
RULES = DASHBOARDS / "alerts.yml"
RULE_TESTS = DASHBOARDS / "alerts_test.yml"
LOAD_PANELS = (
    "Load shed by class and reason",
    "Budget used by class",
    "Redis lanes busy",
    "Live buffers",
)
ALERTS = {
    "ActivityEventsHighErrorRatio",
    "ActivityEventsHighLatency",
    "ActivityEventsRedisDown",
    "ActivityEventsTargetDown",
    "ActivityEventsFollowersLagging",
    "ActivityEventsSheddingLoad",
    "ActivityEventsSubscriptionLagGrowing",
    "ActivityEventsSubscriptionDeadLetters",
}
TEMPLATE_VALUES = {
    "$__rate_interval": "30s",
    "$__interval": "1s",
    "$__range": "1m",
    "${job}": "activity-events",
    "$job": "activity-events",
    "${instance}": ".*",
    "$instance": ".*",
}
CORE_PANELS = (
    "Request rate",
    "Request rate by method and code",
    "Unary latency p50 / p95 / p99",
    "Events appended vs duplicates",
)
SUBSCRIPTION_PANELS = (
    "Subscription lag and pending",
    "Subscription deliveries",
    "Subscription dead letters",
    "Subscription consumers",
)
SUBSCRIPTION = "dashboard"
POISON = 2
"""Id of the deployment-1 event the test's subscriber never acknowledges."""


def tool(name: str) -> str:
    """Path of an external tool; skip (fail in CI) when it is not installed."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def rule_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def substitute(expr: str) -> str:
    for variable, value in TEMPLATE_VALUES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


METRIC_NAME = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")


# --------------------------------------------------------------------------- static checks


def test_dashboard_shape() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
    titles = {panel["title"] for panel in panels(board)}
    for title in (*CORE_PANELS, "Error ratio by method", "Active followers", "Hub lag p50 / p99",
                  "Redis command latency p99", "Redis up", "Request rate per pod",
                  *SUBSCRIPTION_PANELS, *LOAD_PANELS):  # fmt: skip
        assert title in titles
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_alert_rules_pass_promtool_unit_tests() -> None:
    promtool = tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in check.stdout
    result = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=DASHBOARDS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    assert firing == ALERTS
    assert quiet == ALERTS
    assert {rule for rule, _ in rule_queries()} == ALERTS


def _typecheck(*files: Path) -> subprocess.CompletedProcess[str]:
    node = tool("node")
    if not (DASHBOARDS / "node_modules" / ".bin" / "tsc").exists():
        message = "dashboards/node_modules is missing (.ci/run runs npm ci there)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [node, str(DASHBOARDS / "check-dashboards.mjs"), *map(str, files)],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=DASHBOARDS,
    )


def test_dashboard_type_checks_against_grafana_schema() -> None:
    result = _typecheck()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "type-checked activity-events.json" in result.stdout


def test_type_check_rejects_a_broken_dashboard(tmp_path: Path) -> None:
    broken = dashboard()
    broken["panels"][1]["fieldConfig"]["defaults"]["thresholds"]["mode"] = "sometimes"
    broken["graphTooltip"] = "shared"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = _typecheck(path)
    assert result.returncode != 0
    assert '"sometimes"' in result.stdout
    assert "DashboardCursorSync" in result.stdout


# --------------------------------------------------------------------------- real Prometheus


class Prometheus:
    """A Prometheus server process scraping ``target`` every second."""

    def __init__(self, binary: str, directory: Path, target: str) -> None:
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "activity-events", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/-/ready", timeout=1
                ) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def query(self, expr: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.get("/api/v1/query", query=expr)
        return answer

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.log.close()


async def _traffic(stub: Any, rounds: int) -> None:
    """A bit of everything: creates, duplicates, errors, batches, lists, deletes."""
    for n in range(rounds):
        base = n * 10
        for event_id in range(base + 1, base + 4):
            await stub.CreateEvent(
                pb.EventRequest(id=event_id, deployment_id=1, message=f"event {event_id}"),
                timeout=5,
            )
        await stub.CreateEvent(
            pb.EventRequest(id=base + 1, deployment_id=1, message=f"event {base + 1}"), timeout=5
        )  # duplicate
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.CreateEvent(pb.EventRequest(id=1, deployment_id=-1), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.CreateEvent(
                pb.EventRequest(id=base + 1, deployment_id=1, message="changed"), timeout=5
            )  # conflict
        await stub.CreateEvents(
            pb.CreateEventsRequest(
                events=[
                    pb.EventRequest(id=base + 5, deployment_id=2, message="batch"),
                    pb.EventRequest(id=base + 6, deployment_id=2, message="batch"),
                    pb.EventRequest(id=-1, deployment_id=2, message="invalid"),
                ]
            ),
            timeout=5,
        )
        assert [e async for e in stub.ListEvents(pb.Deployment(id=1), timeout=5)]
        await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=5)
        await stub.CreateEvent(pb.EventRequest(id=1, deployment_id=100 + n, message="x"), timeout=5)
        await stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=100 + n), timeout=5)
        await asyncio.sleep(1.1)  # spread over scrapes, so rate() sees increases


class Subscriber:
    """A Subscribe call on deployment 1 that acknowledges every event but ``POISON``.

    With a short visibility timeout and two deliveries at most, the poison event
    is redelivered once and then dead-lettered, so every subscription counter
    and gauge has a sample.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.outbox: asyncio.Queue[pb.SubscribeRequest] = asyncio.Queue()
        opening = pb.SubscribeOpen(subscription=SUBSCRIPTION, deployment_id=1,
                                   start=pb.START_POSITION_BEGINNING,
                                   visibility_timeout_ms=200, max_deliveries=2)  # fmt: skip
        self.outbox.put_nowait(pb.SubscribeRequest(open=opening))
        self.call = pb_grpc.SubscriptionsStub(channel).Subscribe(self._requests(), timeout=120)
        self.poison_deliveries: list[int] = []
        self.acknowledged = 0
        self.task = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[pb.SubscribeRequest]:
        while True:
            yield await self.outbox.get()

    async def _read(self) -> None:
        async for response in self.call:
            assert not response.ack_errors, response.ack_errors
            poison = [d.delivery_count for d in response.deliveries if d.event.id == POISON]
            self.poison_deliveries += poison
            cursors = [d.cursor for d in response.deliveries if d.event.id != POISON]
            if cursors:
                self.acknowledged += len(cursors)
                self.outbox.put_nowait(pb.SubscribeRequest(ack=pb.SubscribeAck(cursors=cursors)))

    async def wait_dead_lettered(self, channel: grpc.aio.Channel, timeout: float = 15.0) -> None:
        """Until the poison event is in the dead letters (then refresh the gauges)."""
        subscriptions = pb_grpc.SubscriptionsStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            assert not self.task.done(), self.task
            letters = await subscriptions.ListDeadLetters(
                pb.ListDeadLettersRequest(subscription=SUBSCRIPTION), timeout=5
            )
            if letters.dead_letters:
                break
            assert time.monotonic() < deadline, f"not dead-lettered: {self.poison_deliveries}"
            await asyncio.sleep(0.2)
        assert [letter.event.event.id for letter in letters.dead_letters] == [POISON]
        assert self.poison_deliveries == [1, 2]
        assert self.acknowledged > 0
        listed = await subscriptions.ListSubscriptions(pb.ListSubscriptionsRequest(), timeout=5)
        [info] = [s for s in listed.subscriptions if s.name == SUBSCRIPTION]
        assert (info.dead_letters, info.consumers) == (1, 1)

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await asyncio.wait_for(self.task, 5)


@pytest.mark.slow
@pytest.mark.tools
async def test_real_prometheus_evaluates_every_dashboard_and_rule_query(
    app_factory: Any, channel_factory: Any, tmp_path: Path
) -> None:
    prometheus_binary = tool("prometheus")
    promtool = tool("promtool")
    app = await app_factory()
    channel = channel_factory(app.port)
    stub = pb_grpc.ActivityEventsStub(channel)
    target = f"127.0.0.1:{app.metrics_port}"
    prometheus = Prometheus(prometheus_binary, tmp_path, target)
    follower = None
    subscriber = None
    try:
        await asyncio.to_thread(prometheus.wait_ready)
        # A follower stays open through the scrapes: followers gauge and hub lag.
        follower = stub.WatchEvents(pb.WatchEventsRequest(deployment_id=1, follow=True), timeout=60)
        while not (await asyncio.wait_for(follower.read(), 5)).caught_up:
            pass
        await _traffic(stub, rounds=2)
        live = await asyncio.wait_for(follower.read(), 5)
        assert live.events
        # A consumer stays open through the scrapes too: subscription metrics.
        subscriber = Subscriber(channel)
        await _traffic(stub, rounds=3)
        await subscriber.wait_dead_lettered(channel)

        async def scraped(expr: str) -> bool:
            answer = await asyncio.to_thread(prometheus.query, expr)
            result = answer["data"]["result"]
            return bool(result) and float(result[0]["value"][1]) > 0

        # Both rates need two scrapes after the traffic and the dead letter.
        for expr in (
            'sum(increase(activity_events_appended_total{job="activity-events"}[30s]))',
            'count(rate(activity_subscription_dead_lettered_total{job="activity-events"}[30s]))',
        ):
            for _ in range(50):
                if await scraped(expr):
                    break
                await asyncio.sleep(0.2)
        up = await asyncio.to_thread(prometheus.query, 'up{job="activity-events"}')
        assert [r["value"][1] for r in up["data"]["result"]] == ["1"]

        board = dashboard()
        failures = []
        empty = []
        for title, expr in [*dashboard_queries(board), *rule_queries()]:
            answer = await asyncio.to_thread(prometheus.query, substitute(expr))
            if answer.get("status") != "success":
                failures.append((title, expr, answer.get("error")))
            elif title in (*CORE_PANELS, *SUBSCRIPTION_PANELS) and not answer["data"]["result"]:
                empty.append((title, expr))
        assert not failures, failures
        assert not empty, empty

        # Variables' label_values() selectors find series.
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            selector = re.fullmatch(r"label_values\((.*), *\w+\)", variable["query"]["query"])
            assert selector is not None
            series = await asyncio.to_thread(
                prometheus.get, "/api/v1/series", **{"match[]": substitute(selector.group(1))}
            )
            assert series["status"] == "success" and series["data"], variable["name"]

        # Every metric the dashboard names exists in what Prometheus scraped.
        known = set(
            (await asyncio.to_thread(prometheus.get, "/api/v1/label/__name__/values"))["data"]
        )
        used = {name for _, expr in dashboard_queries(board) for name in METRIC_NAME.findall(expr)}
        assert used - known == set(), used - known

        # The raw scrape after traffic: promtool's linter has nothing to say.
        reader, writer = await asyncio.open_connection("127.0.0.1", app.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        scrape = raw.partition(b"\r\n\r\n")[2]
        for name in used - {"up"}:
            assert name.encode() in scrape, name
        lint = subprocess.run(
            [promtool, "check", "metrics"],
            input=scrape,
            check=False,
            capture_output=True,
            timeout=60,
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert lint.stdout.strip() == b"" and lint.stderr.strip() == b"", lint.stdout + lint.stderr
    finally:
        if follower is not None:
            follower.cancel()
        if subscriber is not None:
            await subscriber.close()
        prometheus.stop()
