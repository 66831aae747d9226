"""Redis connections for every deployment shape: one node, Sentinel, Cluster.

The shape comes from the URL scheme, so one setting (ACTIVITY_REDIS_URL)
says everything:

=================================================  ==============================
``redis://[user:pass@]host:port/db``               one node (``rediss://``: TLS)
``unix:///path/to/redis.sock``                     one node on a unix socket
``redis+sentinel://[user:pass@]h1:26379,h2:26379/mymaster[/db]``
                                                   primary found through Sentinel
``redis+cluster://[user:pass@]h1:7000,h2:7001``    Redis Cluster (``rediss+cluster``)
=================================================  ==============================

Callers get a ``redis.asyncio`` client whose concurrency the store bounds
itself (see EventStore), so connections per replica stay bounded in every
shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from activity_events.app.settings import REDIS_SCHEMES, Settings
from activity_events.observability.logs import redact

logger = logging.getLogger(__name__)

"""URL scheme -> deployment shape."""


CLIENT_NAME = "activity-events"
"""CLIENT SETNAME of every connection the service opens."""


@dataclass(frozen=True)
class Target:
    """A parsed ACTIVITY_REDIS_URL."""

    url: str
    mode: str
    tls: bool
    hosts: list[tuple[str, int]] = field(default_factory=list)
    username: str | None = None
    password: str | None = None
    service: str | None = None
    db: int = 0
    options: dict[str, str] = field(default_factory=dict)

    @property
    def cluster(self) -> bool:
        return self.mode == "cluster"


def parse(url: str) -> Target:
    """Parse a Redis URL of any supported shape (see the module docstring)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"unsupported redis URL scheme {scheme!r}: use one of {', '.join(REDIS_SCHEMES)}"
        )
    mode = REDIS_SCHEMES[scheme]
    tls = scheme.startswith("rediss")
    if mode == "single":
        return Target(url=url, mode=mode, tls=tls)
    rest, _, query = rest.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"redis URL host {item!r} must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    service = None
    db = 0
    if mode == "sentinel":
        if not parts:
            raise ValueError("redis+sentinel:// URL needs the primary's name: .../mymaster")
        service = parts[0]
        if len(parts) > 1:
            db = int(parts[1])
    return Target(url, mode, tls, hosts, username, password, service, db, options)


def _common(settings: Settings, target: Target, socket_timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        # Named so operators (and tests) can tell our connections apart in CLIENT LIST.
        "client_name": CLIENT_NAME,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout_seconds,
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [rexc.ConnectionError],
    }
    password = target.password
    if settings.redis_password is not None:
        password = settings.redis_password.get_secret_value()
    if password:
        kwargs["password"] = password
    username = target.username or settings.redis_username
    if username:
        kwargs["username"] = username
    return kwargs


def _tls(settings: Settings) -> dict[str, Any]:
    tls: dict[str, Any] = {}
    if settings.redis_tls_ca_file is not None:
        tls["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file is not None:
        tls["ssl_certfile"] = str(settings.redis_tls_cert_file)
    if settings.redis_tls_key_file is not None:
        tls["ssl_keyfile"] = str(settings.redis_tls_key_file)
    return tls


def connect(
    settings: Settings, url: str, *, max_connections: int, socket_timeout: float
) -> aioredis.Redis:
    """A client for ``url`` holding at most ``max_connections`` connections (per
    node, for Cluster). One quick retry on a fresh connection hides a stale
    pooled socket after a Redis restart or failover."""
    target = parse(url)
    kwargs = _common(settings, target, socket_timeout)
    if target.tls:
        kwargs.update(_tls(settings))
    logger.debug("redis %s client for %s", target.mode, redact(url))
    if target.mode == "single":
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=settings.redis_timeout_seconds,
            health_check_interval=30,
            **kwargs,
        )
        return aioredis.Redis(connection_pool=pool)
    if target.mode == "cluster":
        if target.tls:
            kwargs["ssl"] = True
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        cluster = RedisCluster(
            startup_nodes=nodes,
            max_connections=max_connections,
            require_full_coverage=True,
            **kwargs,
        )
        return cluster  # type: ignore[return-value]  # same command API
    # Sentinel: the sentinels themselves take the same credentials only when
    # given as sentinel_* options; the primary gets the URL's credentials.
    if target.tls:
        kwargs["ssl"] = True
    sentinel_kwargs = {
        "socket_timeout": settings.redis_connect_timeout_seconds,
        "socket_connect_timeout": settings.redis_connect_timeout_seconds,
    }
    if "sentinel_password" in target.options:
        sentinel_kwargs["password"] = target.options["sentinel_password"]  # type: ignore[assignment]
    sentinel = Sentinel(target.hosts, sentinel_kwargs=sentinel_kwargs, **kwargs)  # type: ignore[no-untyped-call]
    assert target.service is not None
    primary: aioredis.Redis = sentinel.master_for(
        target.service, db=target.db, max_connections=max_connections
    )
    return primary


def node_client(
    settings: Settings, target: Target, index: int, *, socket_timeout: float | None
) -> aioredis.Redis:
    """A plain single-connection client to the ``index``-th host of a Cluster URL
    (modulo the number of hosts): Pub/Sub on a Cluster reaches every node, so
    the follower hub listens on any one and moves on when it fails."""
    host, port = target.hosts[index % len(target.hosts)]
    kwargs = _common(settings, target, socket_timeout or 0)
    kwargs["socket_timeout"] = socket_timeout
    if target.tls:
        kwargs.update(_tls(settings), ssl=True)
    return aioredis.Redis(host=host, port=port, single_connection_client=True, **kwargs)
