"""Redis URL shapes and their redaction."""

from __future__ import annotations

import pytest

from activity_events.app.settings import Settings
from activity_events.observability.logs import redact
from activity_events.redis import connection


def test_single_node_urls_are_left_to_redis_py() -> None:
    for url in ("redis://h:1/0", "rediss://u:p@h:2", "unix:///tmp/r.sock"):
        target = connection.parse(url)
        assert target.mode == "single"
        assert not target.cluster
    assert connection.parse("rediss://h:1").tls


def test_cluster_url() -> None:
    target = connection.parse("redis+cluster://user:pw@10.0.0.1:7000,[::1]:7001")
    assert target.mode == "cluster" and target.cluster and not target.tls
    assert target.hosts == [("10.0.0.1", 7000), ("::1", 7001)]
    assert (target.username, target.password) == ("user", "pw")
    assert connection.parse("rediss+cluster://h:7000").tls


def test_sentinel_url() -> None:
    target = connection.parse(
        "redis+sentinel://:s%40cret@h1:26379,h2:26380/mymaster/2?sentinel_password=x"
    )
    assert target.mode == "sentinel"
    assert target.hosts == [("h1", 26379), ("h2", 26380)]
    assert (target.service, target.db, target.password) == ("mymaster", 2, "s@cret")
    assert target.options == {"sentinel_password": "x"}


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:1", "unsupported"),
        ("redis+sentinel://h:26379", "primary's name"),
        ("redis+cluster://h", "host:port"),
        ("redis+cluster://h:x", "host:port"),
    ],
)
def test_bad_urls_say_why(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        connection.parse(url)


def test_settings_accept_every_shape_and_refuse_others() -> None:
    for url in ("redis+cluster://h:1", "redis+sentinel://h:1/m", "unix:///x"):
        assert Settings(redis_url=url).redis_url is not None
    with pytest.raises(ValueError, match="ACTIVITY_REDIS_URL must start with"):
        Settings(redis_url="mysql://h:1")


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:topsecret@h:6379/0",
        "redis://:topsecret@h:1",
        "redis://u:top@secret@h:1/0",
        "redis+cluster://u:topsecret@h1:7000,h2:7001",
        "redis+sentinel://h:26379/m?sentinel_password=topsecret&x=1",
    ],
)
def test_redaction_hides_passwords(url: str) -> None:
    shown = redact(url)
    assert "secret" not in shown
    assert "***" in shown
