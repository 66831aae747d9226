"""Write the ``settings`` part of helm/activity-events/values.schema.json from Settings.

The chart renders ``.Values.settings.<name>`` as ``ACTIVITY_<NAME>``; the
schema lists exactly the settings a user may set there (every field of
:class:`activity_events.app.settings.Settings` except those the chart sets
itself), with their types and bounds, so ``helm install`` rejects a typo or an
out-of-range value. Run it after adding a setting; ``--check`` (used by
tests/test_helm.py) fails when the committed schema is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from activity_events.app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "helm" / "activity-events" / "values.schema.json"

#: Settings the chart sets itself (ports, hosts, data dir, credentials from
#: Secrets, file paths of mounted Secrets); not accepted under ``settings``.
CHART_MANAGED = frozenset(
    {
        "port",
        "host",
        "metrics_port",
        "metrics_host",
        "data_dir",
        "redis_url",
        "redis_password",
        "redis_username",
        "consul_http_token",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "auth_tokens_file",
        "redis_tls_ca_file",
        "redis_tls_cert_file",
        "redis_tls_key_file",
    }
)

_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def settings_properties() -> dict[str, Any]:
    """JSON-schema properties of every setting configurable through ``.Values.settings``."""
    model = Settings.model_json_schema()["properties"]
    properties: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        if name in CHART_MANAGED:
            continue
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        source = model.get(name) or (model.get(str(choices[0])) if choices else None)
        if source is None:
            raise SystemExit(f"no JSON schema for setting {name}")
        nullable = False
        if "anyOf" in source:
            # Optional settings (X | None): the non-null branch; null leaves them unset.
            branches = [b for b in source["anyOf"] if b.get("type") != "null"]
            nullable = len(branches) < len(source["anyOf"])
            if len(branches) != 1:
                raise SystemExit(f"setting {name} has no single type the chart can render")
            source = branches[0]
        entry: dict[str, Any] = {"description": field.description}
        if "enum" in source:
            entry["type"] = "string"
            entry["enum"] = source["enum"]
        elif source.get("type") in {"integer", "number", "boolean", "string"}:
            entry["type"] = source["type"]
        else:
            raise SystemExit(f"setting {name} has no plain type the chart can render: {source}")
        entry.update({k: source[k] for k in _BOUNDS if k in source})
        if nullable:
            entry["type"] = [entry["type"], "null"]
            if "enum" in entry:
                entry["enum"] = [*entry["enum"], None]
        properties[name] = entry
    return properties


def generated_schema() -> str:
    """The schema file's text with the settings properties brought up to date."""
    document = json.loads(SCHEMA.read_text())
    document["properties"]["settings"]["properties"] = settings_properties()
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the schema is stale")
    args = parser.parse_args(argv)
    wanted = generated_schema()
    if args.check:
        if SCHEMA.read_text() != wanted:
            print(f"{SCHEMA} is stale: run python scripts/gen_chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
