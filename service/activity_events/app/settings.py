"""Typed settings, read once at start-up and passed down.

Every setting comes from an environment variable with the ``ACTIVITY_``
prefix (``ACTIVITY_REDIS_URL``...), except the gRPC port, which keeps the
original service's plain ``PORT`` (``ACTIVITY_PORT`` is accepted too).
Nothing else in the package reads the environment for its configuration.

Settings may also come from a Consul KV prefix (``ACTIVITY_CONSUL_PREFIX``,
with Consul's standard ``CONSUL_HTTP_ADDR`` and ``CONSUL_HTTP_TOKEN``); see
:mod:`activity_events.app.consul`. Precedence: explicit arguments > environment >
Consul > defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from activity_events.app.consul import DEFAULT_CONSUL_ADDR, ConsulSettingsSource

REDIS_SCHEMES = {
    "redis": "single",
    "rediss": "single",
    "unix": "single",
    "redis+sentinel": "sentinel",
    "rediss+sentinel": "sentinel",
    "redis+cluster": "cluster",
    "rediss+cluster": "cluster",
}
"""URL schemes of ACTIVITY_REDIS_URL and the topology each names: one node,
Sentinel, Cluster (connected by :mod:`activity_events.redis.connection`)."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "activity-events"


class Settings(BaseSettings):
    """All knobs of the server. Field docs double as the settings table (docs/settings.md)."""

    model_config = SettingsConfigDict(
        env_prefix="ACTIVITY_",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    # --- gRPC -----------------------------------------------------------------
    port: int = Field(
        50051,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("ACTIVITY_PORT", "PORT"),
        description="gRPC port (legacy name PORT). 0 picks a free port.",
    )
    host: str = Field("[::]", description="Address the gRPC server binds to.")
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    grace_seconds: float = Field(
        10.0, gt=0, description="On SIGTERM/SIGINT, time in-flight calls get to finish."
    )
    max_receive_bytes: int = Field(
        4 * 1024 * 1024, gt=1024, description="Largest gRPC request message accepted."
    )
    max_connection_age_seconds: float = Field(
        300.0,
        ge=0,
        description="Connections are closed (GOAWAY) after this age so clients rebalance "
        "across replicas; 0 disables.",
    )
    max_connection_age_grace_seconds: float = Field(
        30.0, ge=0, description="Time in-flight calls get after a max-age GOAWAY."
    )
    # --- security -----------------------------------------------------------------
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate (chain) of the gRPC port; with tls_key_file the port "
        "speaks TLS only. Unset: plaintext.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients must present a certificate it signed "
        "(mutual TLS).",
    )
    auth_tokens_file: Path | None = Field(
        None,
        description="File of bearer tokens, one 'role[,role...] token [name]' per line "
        "(roles writer, reader, admin); re-read when it changes. Unset: no auth.",
    )
    auth_reflection: Literal["open", "token"] = Field(
        "token",
        description="With auth on, server reflection is 'open' to all or needs a valid "
        "'token' of any role. Health is always open.",
    )

    # --- events ---------------------------------------------------------------
    max_message_bytes: int = Field(
        64 * 1024, gt=0, description="Longest event message (UTF-8 bytes)."
    )
    max_batch: int = Field(1000, gt=0, description="Most events in one CreateEvents call.")
    page_size: int = Field(
        2000, gt=0, le=10000, description="Events read from Redis per history page."
    )
    retention_max_len: int = Field(
        0, ge=0, description="Keep about this many events per deployment; 0 keeps all."
    )
    retention_max_age_seconds: float = Field(
        0, ge=0, description="Drop events older than this (approximately); 0 keeps all."
    )

    # --- under load: admission and isolation ------------------------------------
    max_inflight_writes: int = Field(
        2000,
        gt=0,
        description="CreateEvent and CreateEvents calls in progress at once; beyond it "
        "RESOURCE_EXHAUSTED (writes are coalesced, so this is a memory bound).",
    )
    max_inflight_reads: int = Field(
        8,
        gt=0,
        description="History reads (ListEvents, WatchEvents without follow), listings, admin "
        "calls and page API requests in progress at once; beyond it RESOURCE_EXHAUSTED.",
    )
    max_inflight_health: int = Field(
        1000, gt=0, description="Health Check and Watch calls in progress at once."
    )
    max_streams: int = Field(
        5000,
        gt=0,
        description="Long-lived streams of every kind together (gRPC followers, live page "
        "streams, subscription consumers); beyond it RESOURCE_EXHAUSTED.",
    )
    max_followers: int = Field(
        2000, gt=0, description="WatchEvents follow streams at once (within max_streams)."
    )
    max_page_streams: int = Field(
        2000, gt=0, description="Live activity-page streams (SSE) at once (within max_streams)."
    )
    max_consumers: int = Field(
        1000, gt=0, description="Subscribe consumers at once (within max_streams)."
    )
    reads_per_turn: int = Field(
        1,
        gt=0,
        description="Messages history streams may send per event-loop turn, all together, so "
        "that reads cannot crowd writes out of the event loop.",
    )
    streams_per_turn: int = Field(
        64,
        gt=0,
        description="Messages long-lived streams (followers, page streams, consumers) may send "
        "per event-loop turn, all together. Larger than reads_per_turn: their messages are "
        "small and many streams wake at once, and every extra turn costs the loop a poll.",
    )
    stream_stall_seconds: float = Field(
        30.0,
        gt=0,
        description="A stream whose client reads nothing for this long is ended with "
        "RESOURCE_EXHAUSTED (and its last cursor), releasing its slot.",
    )
    stream_buffer_bytes: int = Field(
        1 << 20,
        ge=64 * 1024,
        description="Memory one history stream may hold (the page being sent and the next "
        "one, read ahead); pages are sized to fit.",
    )

    # --- followers --------------------------------------------------------------
    follower_queue: int = Field(
        4096,
        gt=0,
        description="Live events kept per followed deployment for followers that fall "
        "behind; one further behind is ended with RESOURCE_EXHAUSTED and its last cursor.",
    )
    live_log_bytes: int = Field(
        4 << 20,
        ge=64 * 1024,
        description="Most bytes of live events kept per followed deployment (with "
        "follower_queue, whichever is reached first).",
    )
    live_wakeups_per_second: float = Field(
        2000,
        ge=0,
        description="Follower wake-ups per second, all followers together: with many "
        "followers live events come in bigger, rarer batches so writers keep their share "
        "of the CPU. 0: no limit.",
    )
    hub_block_ms: int = Field(
        1000, gt=0, description="Longest blocking XREAD of the follower hub, in ms."
    )

    # --- Redis ------------------------------------------------------------------
    redis_url: SecretStr | None = Field(
        None,
        description="redis://, rediss://, unix://, redis+sentinel://h:26379,.../primary or "
        "redis+cluster://h:7000,... URL. Unset: start an embedded Redis under data_dir.",
    )
    redis_password: SecretStr | None = Field(
        None, description="Redis password, when not given in the URL."
    )
    redis_username: str | None = Field(
        None, description="Redis ACL user name, when not given in the URL."
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="CA bundle that signs the Redis server certificate (rediss://)."
    )
    redis_tls_cert_file: Path | None = Field(
        None, description="Client certificate for Redis TLS with client authentication."
    )
    redis_tls_key_file: Path | None = Field(None, description="Private key of redis_tls_cert_file.")
    redis_write_connections: int = Field(
        4, gt=0, description="Redis connections of the writes lane (creates)."
    )
    redis_read_connections: int = Field(
        4, gt=0, description="Redis connections of the reads lane (history, listings, admin)."
    )
    redis_stream_connections: int = Field(
        4,
        gt=0,
        description="Redis connections of the streams lane (followers' history, page streams, "
        "consumers). The follower hub and the health probe hold one more each.",
    )
    redis_pool_wait_seconds: float = Field(
        0.5,
        gt=0,
        description="Longest wait for a free connection of a lane; past it the call is "
        "refused with RESOURCE_EXHAUSTED (the lane is busy, Redis is not the problem).",
    )
    redis_timeout_seconds: float = Field(
        1.0,
        gt=0,
        description="Longest a Redis command may take once it has a connection; past it "
        "the call fails UNAVAILABLE.",
    )
    redis_connect_timeout_seconds: float = Field(1.0, gt=0, description="Connect timeout.")
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="Acknowledge a create only once this many replicas have it (Redis WAIT), "
        "so a failover loses no acknowledged event; 0 answers once the primary has it.",
    )
    redis_wait_timeout_ms: int = Field(
        500,
        gt=0,
        description="Longest WAIT for replica acknowledgements; short of them the call "
        "fails UNAVAILABLE (a retry is deduplicated).",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where the embedded Redis keeps its data (only without redis_url).",
    )

    # --- telemetry ----------------------------------------------------------------
    log_level: LogLevel = Field("INFO", description="Log level of the JSON logs.")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="HTTP port of /metrics, /healthz, /readyz; 0 picks one."
    )
    metrics_host: str = Field("0.0.0.0", description="Address the HTTP side port binds to.")  # noqa: S104

    # --- Consul KV (read once at start-up) ---------------------------------------
    consul_prefix: str = Field(
        "",
        description="Consul KV prefix holding settings, one key per setting "
        "(e.g. activity-events); empty: Consul is not used.",
    )
    consul_http_addr: str = Field(
        DEFAULT_CONSUL_ADDR,
        validation_alias=AliasChoices("CONSUL_HTTP_ADDR", "ACTIVITY_CONSUL_HTTP_ADDR"),
        description="Consul agent address: host:port or http(s):// URL (standard name "
        "CONSUL_HTTP_ADDR).",
    )
    consul_http_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("CONSUL_HTTP_TOKEN", "ACTIVITY_CONSUL_HTTP_TOKEN"),
        description="Consul ACL token (standard name CONSUL_HTTP_TOKEN).",
    )
    consul_timeout_seconds: float = Field(
        2.0, gt=0, description="Timeout of the one Consul KV request made at start-up."
    )
    consul_fallback: bool = Field(
        False,
        description="Consul unreachable at start-up: false fails with a clear error, true "
        "logs a warning and starts from the environment and defaults.",
    )

    # --- activity page ------------------------------------------------------------
    page_enabled: bool = Field(
        True,
        description="Serve the activity page (/, /deployments/<id>, /api/...) for people "
        "on the HTTP side port; false turns it off. With auth_tokens_file set it needs a "
        "reader token.",
    )
    page_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve the activity page on this port of metrics_host instead of "
        "metrics_port (0 picks one); unset: on metrics_port beside /metrics.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit arguments > environment > Consul KV > defaults."""
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            file_secret_settings,
            ConsulSettingsSource(settings_cls),
        )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = value.get_secret_value().partition("://")[0]
            if scheme not in REDIS_SCHEMES:
                raise ValueError(
                    f"ACTIVITY_REDIS_URL must start with one of "
                    f"{', '.join(s + '://' for s in REDIS_SCHEMES)}; not {scheme[:20] or 'nothing'}://"
                )
        return value
