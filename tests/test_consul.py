"""Settings from Consul KV, against an HTTP server speaking Consul's KV API.

No Consul agent runs here, so ``FakeConsul`` implements the documented part
of the API the source uses: ``GET /v1/kv/<prefix>?recurse=true`` answering a
JSON list of entries with base64 ``Value`` (null for folders), the
``X-Consul-Index`` header, 404 for a prefix without keys and 403 for a wrong
ACL token. The store is seeded from ``consul kv export``/``import`` JSON, the
format of config/consul-kv.json.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from activity_events.app.consul import ConsulSettingsError, decode_entries, kv_url
from activity_events.app.settings import Settings
from tests.support.ports import free_port
from tests.support.redis_process import RedisProcess
from tests.support.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
KV_SEED = ROOT / "config" / "consul-kv.json"
ENV_EXAMPLE = ROOT / "config" / "example.env"

PREFIX = "activity-events"
TOKEN = "c0ffee00-0000-4000-8000-000000000001"

#: The source's request must give up within its timeout plus this slack.
TIMEOUT_SLACK_SECONDS = 1.5


class FakeConsul:
    """A Consul agent's KV endpoint, in a thread, on a free port."""

    def __init__(self, token: str | None = None) -> None:
        self.entries: dict[str, str | None] = {}
        self.token = token
        self.index = 42
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def put(self, key: str, value: str | None) -> None:
        self.entries[key] = value

    def import_json(self, path: Path) -> None:
        """What ``consul kv import @file`` does."""
        for entry in json.loads(path.read_text()):
            self.entries[entry["key"]] = base64.b64decode(entry["value"]).decode()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        self.requests.append(
            {"path": url.path, "query": query, "token": request.headers.get("X-Consul-Token")}
        )
        if self.delay:
            time.sleep(self.delay)
        if self.token is not None and request.headers.get("X-Consul-Token") != self.token:
            self.reply(request, 403, b"Permission denied")
            return
        if not url.path.startswith("/v1/kv/") or "recurse" not in query:
            self.reply(request, 400, b"only recurse reads are implemented")
            return
        prefix = urllib.parse.unquote(url.path[len("/v1/kv/") :])
        matches = [
            {
                "LockIndex": 0,
                "Key": key,
                "Flags": 0,
                "Value": None if value is None else base64.b64encode(value.encode()).decode(),
                "CreateIndex": self.index,
                "ModifyIndex": self.index,
            }
            for key, value in sorted(self.entries.items())
            if key.startswith(prefix)
        ]
        if not matches:
            self.reply(request, 404, b"")
            return
        self.reply(request, 200, json.dumps(matches).encode(), json_body=True)

    def reply(
        self, request: BaseHTTPRequestHandler, status: int, body: bytes, json_body: bool = False
    ) -> None:
        request.send_response(status)
        request.send_header("X-Consul-Index", str(self.index))
        request.send_header("X-Consul-Knownleader", "true")
        request.send_header("Content-Type", "application/json" if json_body else "text/plain")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def __enter__(self) -> FakeConsul:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def consul(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeConsul]:
    """A fake agent, and an environment pointing the settings at it."""
    with FakeConsul(token=TOKEN) as fake:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", fake.address)
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
        monkeypatch.setenv("ACTIVITY_CONSUL_PREFIX", PREFIX)
        yield fake


@pytest.fixture(autouse=True)
def no_consul_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONSUL_* of the developer's shell must not reach these tests."""
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "ACTIVITY_CONSUL_PREFIX"):
        monkeypatch.delenv(name, raising=False)


# --- loading ---------------------------------------------------------------------------


def test_settings_come_from_the_prefix_with_types(consul: FakeConsul) -> None:
    consul.put(f"{PREFIX}/redis_read_connections", "12")
    consul.put(f"{PREFIX}/grace_seconds", "4.5")
    consul.put(f"{PREFIX}/reflection", "false")
    consul.put(f"{PREFIX}/log_level", "debug")
    consul.put(f"{PREFIX}/PORT", "50123")
    consul.put(f"{PREFIX}/redis-url", "redis://redis.service.consul:6379/1")
    settings = Settings()
    assert settings.redis_read_connections == 12
    assert settings.grace_seconds == 4.5
    assert settings.reflection is False
    assert settings.log_level == "DEBUG"
    assert settings.port == 50123
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://redis.service.consul:6379/1"
    [request] = consul.requests
    assert request["path"] == f"/v1/kv/{PREFIX}/"
    assert "recurse" in request["query"]
    assert request["token"] == TOKEN


def test_precedence_init_over_env_over_consul_over_defaults(
    consul: FakeConsul, monkeypatch: pytest.MonkeyPatch
) -> None:
    consul.put(f"{PREFIX}/redis_read_connections", "12")
    consul.put(f"{PREFIX}/max_batch", "50")
    consul.put(f"{PREFIX}/port", "50123")
    monkeypatch.setenv("ACTIVITY_REDIS_READ_CONNECTIONS", "3")
    monkeypatch.setenv("PORT", "50124")
    settings = Settings()
    assert settings.redis_read_connections == 3  # environment beats Consul
    assert settings.port == 50124  # legacy PORT in the environment beats Consul
    assert settings.max_batch == 50  # Consul beats the default
    assert settings.page_size == Settings.model_fields["page_size"].default
    explicit = Settings(redis_read_connections=2, port=0)
    assert explicit.redis_read_connections == 2  # explicit arguments beat everything
    assert explicit.port == 0


def test_no_prefix_means_no_request(consul: FakeConsul, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACTIVITY_CONSUL_PREFIX")
    consul.put(f"{PREFIX}/max_batch", "50")
    assert Settings().max_batch == Settings.model_fields["max_batch"].default
    assert consul.requests == []


def test_prefix_without_keys_is_not_an_error(consul: FakeConsul) -> None:
    consul.put("other-service/max_batch", "50")
    settings = Settings()
    assert settings.max_batch == Settings.model_fields["max_batch"].default
    assert len(consul.requests) == 1


def test_folders_nested_and_unknown_keys_are_skipped(
    consul: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    consul.put(f"{PREFIX}/", None)
    consul.put(f"{PREFIX}/tls/", None)
    consul.put(f"{PREFIX}/tls/max_batch", "7")
    consul.put(f"{PREFIX}/max_batch", "70")
    consul.put(f"{PREFIX}/no_such_setting", "very-secret-value")
    consul.put(f"{PREFIX}-old/max_batch", "1")  # a sibling prefix, not below ours
    with caplog.at_level(logging.WARNING, logger="activity_events.app.consul"):
        settings = Settings()
    assert settings.max_batch == 70
    assert "no_such_setting" in caplog.text
    assert "very-secret-value" not in caplog.text


def test_consul_cannot_move_consul(consul: FakeConsul, caplog: pytest.LogCaptureFixture) -> None:
    consul.put(f"{PREFIX}/consul_http_addr", "10.0.0.1:8500")
    consul.put(f"{PREFIX}/consul_prefix", "elsewhere")
    with caplog.at_level(logging.WARNING, logger="activity_events.app.consul"):
        settings = Settings()
    assert settings.consul_http_addr == consul.address
    assert settings.consul_prefix == PREFIX
    assert "consul_http_addr" in caplog.text


def test_invalid_value_names_the_setting(consul: FakeConsul) -> None:
    consul.put(f"{PREFIX}/redis_read_connections", "many")
    with pytest.raises(ValidationError, match="redis_read_connections"):
        Settings()


# --- Consul unavailable ------------------------------------------------------------------


def test_unreachable_consul_is_a_clear_error_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens here
    monkeypatch.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
    monkeypatch.setenv("ACTIVITY_CONSUL_PREFIX", PREFIX)
    with pytest.raises(ConsulSettingsError) as caught:
        Settings()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert PREFIX in message
    assert "unreachable" in message
    assert TOKEN not in message


def test_unreachable_consul_with_fallback_logs_and_uses_env_and_defaults(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("ACTIVITY_CONSUL_PREFIX", PREFIX)
    monkeypatch.setenv("ACTIVITY_CONSUL_FALLBACK", "true")
    monkeypatch.setenv("ACTIVITY_MAX_BATCH", "9")
    with caplog.at_level(logging.WARNING, logger="activity_events.app.consul"):
        settings = Settings()
    assert settings.max_batch == 9
    assert settings.consul_fallback is True
    assert "unreachable" in caplog.text
    assert "consul_fallback" in caplog.text


def test_a_hanging_consul_fails_within_the_timeout(
    consul: FakeConsul, monkeypatch: pytest.MonkeyPatch
) -> None:
    consul.delay = 5.0
    monkeypatch.setenv("ACTIVITY_CONSUL_TIMEOUT_SECONDS", "0.5")
    started = time.monotonic()
    with pytest.raises(ConsulSettingsError, match="unreachable"):
        Settings()
    assert time.monotonic() - started < 0.5 + TIMEOUT_SLACK_SECONDS


def test_a_wrong_token_is_reported_as_such(
    consul: FakeConsul, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "wrong-token")
    consul.put(f"{PREFIX}/max_batch", "5")
    with pytest.raises(ConsulSettingsError, match="403") as caught:
        Settings()
    assert "wrong-token" not in str(caught.value)


def test_a_garbled_answer_is_an_error(consul: FakeConsul) -> None:
    with pytest.raises(ValueError, match="not base64"):
        decode_entries(json.dumps([{"Key": f"{PREFIX}/a", "Value": "%%%"}]).encode(), PREFIX)
    with pytest.raises(ValueError, match="not JSON"):
        decode_entries(b"<html>", PREFIX)


def test_addresses_in_consul_forms() -> None:
    assert kv_url("127.0.0.1:8500", "/a/b/") == "http://127.0.0.1:8500/v1/kv/a/b/?recurse=true"
    assert kv_url("https://consul:8501/", "a b") == "https://consul:8501/v1/kv/a%20b/?recurse=true"
    with pytest.raises(ConsulSettingsError, match="unix"):
        kv_url("unix:///var/run/consul.sock", "a")


# --- config/ examples ----------------------------------------------------------------------


def test_kv_seed_loads_into_valid_settings(
    consul: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    seed = json.loads(KV_SEED.read_text())
    assert all(set(entry) == {"key", "flags", "value"} for entry in seed), "consul kv import format"
    assert all(entry["key"].startswith(f"{PREFIX}/") for entry in seed)
    consul.import_json(KV_SEED)
    with caplog.at_level(logging.WARNING, logger="activity_events.app.consul"):
        settings = Settings()
    assert "no setting" not in caplog.text, caplog.text
    assert settings.retention_max_len == 100000
    assert settings.redis_url is not None
    assert len(seed) >= 5


def test_env_example_names_settings_and_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    names: dict[str, str] = {}
    commented: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        text = line.strip()
        if text.startswith("# ") and "=" in text and text[2:].split("=")[0].isupper():
            commented.append(text[2:].split("=")[0])
        if not text or text.startswith("#"):
            continue
        name, _, value = text.partition("=")
        names[name] = value
    known = set()
    for field_name, field in Settings.model_fields.items():
        choices = getattr(field.validation_alias, "choices", None)
        known |= set(choices) if choices else {f"ACTIVITY_{field_name.upper()}"}
    unknown = (set(names) | set(commented)) - known
    assert not unknown, f"config/example.env names unknown settings: {sorted(unknown)}"
    for name, value in names.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.port == int(names["PORT"])
    assert settings.grace_seconds == float(names["ACTIVITY_GRACE_SECONDS"])


# --- the real server ---------------------------------------------------------------------


@pytest.mark.slow
def test_server_takes_its_redis_from_consul(redis_server: RedisProcess, tmp_path: Path) -> None:
    with FakeConsul(token=TOKEN) as fake:
        fake.put(f"{PREFIX}/redis_url", redis_server.url)
        fake.put(f"{PREFIX}/log_level", "DEBUG")
        server = ServerProcess(
            {
                "ACTIVITY_CONSUL_PREFIX": PREFIX,
                "CONSUL_HTTP_ADDR": fake.address,
                "CONSUL_HTTP_TOKEN": TOKEN,
                "ACTIVITY_DATA_DIR": str(tmp_path / "data"),
            },
            cwd=tmp_path,
        )
        try:
            server.start(wait=True)
            assert fake.requests and fake.requests[0]["token"] == TOKEN
            # It really used the Redis from Consul, not an embedded one.
            assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
            assert TOKEN not in server.output
        finally:
            code = server.stop()
        assert code == 0, server.output[-3000:]


@pytest.mark.slow
def test_server_refuses_to_start_when_consul_is_down(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(
        {
            "ACTIVITY_CONSUL_PREFIX": PREFIX,
            "CONSUL_HTTP_ADDR": f"127.0.0.1:{port}",
            "CONSUL_HTTP_TOKEN": TOKEN,
            "ACTIVITY_DATA_DIR": str(tmp_path / "data"),
        },
        cwd=tmp_path,
    )
    try:
        server.start(wait=False)
        code = server.wait(timeout=20)
    finally:
        server.stop()
    assert code == 2
    assert f"127.0.0.1:{port}" in server.output
    assert "unreachable" in server.output
    assert TOKEN not in server.output
    assert "Traceback" not in server.output
    assert len(server.output.strip().splitlines()) == 1, server.output
