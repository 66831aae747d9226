"""Settings read from a Consul KV prefix at start-up.

Operators who keep configuration in Consul put one key per setting under a
prefix (``activity-events/redis_max_connections`` = ``12``) and point the
server at it with ``ACTIVITY_CONSUL_PREFIX``; address and token come from
Consul's own standard variables ``CONSUL_HTTP_ADDR`` and ``CONSUL_HTTP_TOKEN``.
The source is read once, while :class:`~activity_events.app.settings.Settings` is
built, and sits below the environment: explicit arguments > environment >
Consul > defaults, so a value set on a pod always wins over the shared KV.

Key names are the setting names, case-insensitive, with ``-`` accepted for
``_`` and an optional ``ACTIVITY_`` prefix (``PORT``, ``redis-url`` and
``ACTIVITY_LOG_LEVEL`` all work). Folders below the prefix are ignored, as are
keys that name no setting (logged by name, never by value). The ``consul_*``
settings themselves cannot come from Consul: they say where Consul is.

Only the documented HTTP API is used (``GET /v1/kv/<prefix>?recurse=true``,
base64 values, ``X-Consul-Index``), through urllib with a timeout, so no
Consul client library is needed.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource, SettingsError

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

logger = logging.getLogger(__name__)

#: Settings that locate Consul; they are read from the environment only.
CONSUL_FIELDS = frozenset(
    {
        "consul_prefix",
        "consul_http_addr",
        "consul_http_token",
        "consul_timeout_seconds",
        "consul_fallback",
    }
)

#: Consul's own default agent address, as its CLI and SDKs use it.
DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"


class ConsulSettingsError(SettingsError):
    """Consul was asked for settings and could not give them.

    Raised while settings are built, so the server refuses to start with a
    message naming the address and prefix (never the token) rather than
    running with a configuration nobody chose.
    """


def model_key(field_name: str, field: FieldInfo) -> str:
    """The key under which a source must hand ``field`` to the model.

    A field with a validation alias (``port`` is ``ACTIVITY_PORT``/``PORT``)
    is only populated through its first alias, the way the environment
    source hands it over.
    """
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return first if isinstance(first, str) else field_name
    if isinstance(alias, str):
        return alias
    return field_name


def kv_url(address: str, prefix: str) -> str:
    """The ``recurse`` KV URL for ``prefix`` on the agent at ``address``.

    ``address`` is what ``CONSUL_HTTP_ADDR`` holds: ``host:port`` (plain
    HTTP, as the Consul CLI assumes) or a full ``http://``/``https://`` URL.
    """
    base = address.strip().rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    scheme = urllib.parse.urlsplit(base).scheme
    if scheme not in {"http", "https"}:
        raise ConsulSettingsError(
            f"CONSUL_HTTP_ADDR must be host:port or an http(s):// URL, not {scheme}://"
        )
    folder = prefix.strip("/") + "/"
    return f"{base}/v1/kv/{urllib.parse.quote(folder, safe='/')}?recurse=true"


def decode_entries(payload: bytes, prefix: str) -> dict[str, str]:
    """Relative key -> UTF-8 value from a ``/v1/kv/<prefix>?recurse`` body.

    Entries whose ``Value`` is null (folders created with a trailing ``/``)
    carry no setting and are skipped.
    """
    try:
        entries = json.loads(payload)
    except ValueError as exc:
        raise ValueError(f"response is not JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise ValueError("response is not a list of KV entries")
    folder = prefix.strip("/") + "/"
    values: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Key"), str):
            raise ValueError("KV entry without a Key")
        key: str = entry["Key"]
        raw = entry.get("Value")
        relative = key[len(folder) :] if key.startswith(folder) else key
        if raw is None or not relative or "/" in relative:
            continue
        try:
            values[relative] = base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, TypeError) as exc:
            raise ValueError(f"value of {key} is not base64 UTF-8 text") from exc
    return values


class ConsulSettingsSource(PydanticBaseSettingsSource):
    """A pydantic-settings source over one Consul KV prefix.

    Where Consul is, and whether it is used at all, comes from the sources
    consulted before this one (explicit arguments and the environment), so
    place it after them in ``settings_customise_sources``.
    """

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._keys: dict[str, tuple[str, FieldInfo]] = {}
        for name, field in settings_cls.model_fields.items():
            if name not in CONSUL_FIELDS:
                self._keys[name] = (model_key(name, field), field)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: :meth:`__call__` reads the whole prefix in one request."""
        return None, field_name, False

    def _setting(self, name: str) -> Any:
        """A ``consul_*`` setting as the earlier sources gave it, else its default."""
        field = self.settings_cls.model_fields[name]
        state = self.current_state
        candidates = [name]
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            candidates += [c for c in alias.choices if isinstance(c, str)]
        elif isinstance(alias, str):
            candidates.append(alias)
        for key in candidates:
            if key in state:
                return state[key]
        return field.get_default(call_default_factory=True)

    def _field_for(self, key: str) -> str | None:
        """The setting a KV key names (``PORT``, ``redis-url``...), ``None`` for no setting."""
        name = key.strip().lower().replace("-", "_")
        name = name.removeprefix("activity_")
        return name if name in self._keys or name in CONSUL_FIELDS else None

    def __call__(self) -> dict[str, Any]:
        prefix = str(self._setting("consul_prefix") or "").strip("/")
        if not prefix:
            return {}
        address = str(self._setting("consul_http_addr") or DEFAULT_CONSUL_ADDR)
        timeout = float(self._setting("consul_timeout_seconds"))
        fallback = _as_bool(self._setting("consul_fallback"))
        token = self._setting("consul_http_token")
        if token is not None and hasattr(token, "get_secret_value"):
            token = token.get_secret_value()
        try:
            raw = self._fetch(address, prefix, str(token) if token else None, timeout)
        except ConsulSettingsError as exc:
            if not fallback:
                raise
            logger.warning("%s; starting without Consul settings (consul_fallback)", exc)
            return {}

        data: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in raw.items():
            name = self._field_for(key)
            if name is None:
                unknown.append(key)
                continue
            if name in CONSUL_FIELDS:
                logger.warning(
                    "Consul key %s ignored: where Consul is comes from the environment", key
                )
                continue
            model_name, field = self._keys[name]
            data[model_name] = self.prepare_field_value(name, field, value, False)
        if unknown:
            logger.warning(
                "Consul prefix %s has keys that name no setting (ignored): %s",
                prefix,
                ", ".join(sorted(unknown)),
            )
        return data

    def _fetch(
        self, address: str, prefix: str, token: str | None, timeout: float
    ) -> dict[str, str]:
        url = kv_url(address, prefix)
        where = f"Consul KV {url.split('?')[0]}"
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
        if token:
            request.add_header("X-Consul-Token", token)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                index = response.headers.get("X-Consul-Index")
                payload = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                # Consul answers 404 for a prefix without keys: nothing to apply.
                logger.warning("%s has no keys; using environment and defaults", where)
                return {}
            raise ConsulSettingsError(f"{where} answered HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConsulSettingsError(f"{where} is unreachable: {reason}") from exc
        try:
            values = decode_entries(payload, prefix)
        except ValueError as exc:
            raise ConsulSettingsError(f"{where}: {exc}") from exc
        logger.info(
            "Read %d settings from %s (X-Consul-Index %s)", len(values), where, index or "none"
        )
        return values


def _as_bool(value: Any) -> bool:
    """A boolean from an environment string or an already parsed value."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)
