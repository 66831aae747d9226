"""The Helm chart, checked by the real Helm engine and Kubernetes' own schemas.

No cluster exists here, so the chart is linted and rendered by Helm's Go SDK
(``helm-python-sdk`` binds ``libhelm_c``, the same code as ``helm lint`` and
``helm template``), and every rendered object is validated with
``kubernetes-validate --strict`` against the OpenAPI schemas of real
Kubernetes versions. On top of that, the tests assert what the schemas cannot
know: probes, security, grace periods, and that every environment variable the
chart sets is a name the server's Settings actually read.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from kubernetes_validate import utils as kube_validate

from activity_events.app.embedded import RECOMMENDED_REDIS_CONFIG
from activity_events.app.settings import Settings
from activity_events.grpc.health import LIVENESS

pytestmark = pytest.mark.tools

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "activity-events"
DEV_VALUES = ROOT / "tilt" / "values-dev.yaml"
DOCKERFILE = ROOT / "Dockerfile"

#: Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
#: one the installed kubernetes-validate knows: every object must pass both.
KUBE_VERSIONS = ("1.27.0", kube_validate.latest_version())

RELEASE = "ae"
NAMESPACE = "events"

#: The ``--set`` combinations the chart must render (besides the defaults).
SET_COMBINATIONS = {
    "hpa": "autoscaling.enabled=true,autoscaling.targetMemoryUtilizationPercentage=80",
    "servicemonitor": (
        "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.labels.release=prom"
    ),
    "headless": "headless.enabled=true",
    "existing-secret": (
        "redis.existingSecret=prod-redis,redis.existingSecretUrlKey=url,"
        "redis.existingSecretPasswordKey=password"
    ),
    "networkpolicy": (
        "networkPolicy.enabled=true,"
        "networkPolicy.grpcFrom[0].namespaceSelector.matchLabels.team=deploy"
    ),
    "tls": "tls.enabled=true,tls.existingSecret=activity-events-tls,tls.clientAuth=true",
    "auth": "auth.enabled=true,auth.existingSecret=activity-tokens,settings.auth_reflection=open",
    "redis-tls": (
        "redis.url=rediss://redis:6380/0,redis.username=events,redis.tlsSecret=redis-tls,"
        "redis.tlsClientAuth=true"
    ),
    "password": "redis.url=rediss://redis.example:6380/0,redis.password=s3cret",
    "http-probes": "probes.type=http",
    "everything": (
        "autoscaling.enabled=true,metrics.serviceMonitor.enabled=true,headless.enabled=true,"
        "networkPolicy.enabled=true,tls.enabled=true,tls.existingSecret=t,tls.clientAuth=true,"
        "devRedis.enabled=true,"
        "auth.enabled=true,auth.existingSecret=a"
    ),
}


def load_dev_values() -> dict[str, Any]:
    values = yaml.safe_load(DEV_VALUES.read_text())
    assert isinstance(values, dict)
    return values


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[dict[str, Any]]:
    """``helm template``: every rendered object (NOTES.txt excluded)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def one(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    """The single object of ``kind`` (optionally of an app.kubernetes.io/component)."""
    found = [
        obj
        for obj in objects
        if obj["kind"] == kind
        and (
            component is None
            or obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def server_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", "server")


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = server_deployment(objects)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def settings_env_names() -> set[str]:
    """Every environment variable name Settings reads."""
    names: set[str] = set()
    prefix = str(Settings.model_config.get("env_prefix", ""))
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        if choices:
            names.update(str(choice).upper() for choice in choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def rendered_env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Name -> value (ConfigMap data) or valueFrom, as the server container sees it."""
    container = server_container(objects)
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        config = next(
            obj for obj in objects if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == name
        )
        env.update(config["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def validate_strict(obj: dict[str, Any], version: str) -> None:
    kube_validate.validate(obj, version, strict=True)


def all_value_sets() -> Iterator[tuple[str, dict[str, Any]]]:
    yield "defaults", {}
    for name, expression in SET_COMBINATIONS.items():
        yield name, helm.parse_set_string(expression)
    yield "tilt-dev", load_dev_values()


VALUE_SETS = dict(all_value_sets())


# --- helm lint / helm template -----------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_strict_passes(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_objects_pass_kubernetes_validate_strict(name: str, version: str) -> None:
    objects = render(VALUE_SETS[name])
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    assert ("Pod" in kinds) == (name != "tilt-dev"), "helm test pod: on, except under Tilt"
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            # A CRD: kubernetes-validate has no schema for it (checked below instead).
            with pytest.raises(kube_validate.SchemaNotFoundError):
                validate_strict(obj, version)
            continue
        validate_strict(obj, version)


def test_kubernetes_validate_strict_rejects_a_misspelled_field() -> None:
    """The validator used above really is strict: a typo in a probe fails."""
    objects = render()
    deployment = server_deployment(objects)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["servise"] = "typo"
    with pytest.raises(kube_validate.ValidationError):
        validate_strict(deployment, KUBE_VERSIONS[-1])


def test_names_are_cut_to_63_characters() -> None:
    release = "r" * 53  # the longest release name Helm accepts
    helm.validate_release_name(release)
    objects = render(
        helm.parse_set_string("headless.enabled=true,devRedis.enabled=true"), release=release
    )
    for obj in objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63, name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    names = [obj["metadata"]["name"] for obj in objects if obj["kind"] == "Service"]
    assert len(names) == len(set(names)) == 3


def test_values_schema_rejects_unknown_settings() -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="grace_secs"):
        chart.render({"settings": {"grace_secs": 3}}, name=RELEASE)


def test_chart_refuses_a_grace_period_shorter_than_the_drain() -> None:
    values = {"settings": {"grace_seconds": 30}, "terminationGracePeriodSeconds": 30}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="terminationGrace"):
        chart.render(values, name=RELEASE)


def test_chart_refuses_to_run_replicas_without_redis() -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match=r"redis\.url"):
        chart.render({"redis": {"url": ""}}, name=RELEASE)


# --- the server's settings ----------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_env_name_is_a_settings_name(name: str) -> None:
    env = rendered_env(render(VALUE_SETS[name]))
    unknown = set(env) - settings_env_names()
    assert not unknown, f"the chart sets variables Settings never reads: {sorted(unknown)}"
    assert {"PORT", "ACTIVITY_METRICS_PORT", "ACTIVITY_GRACE_SECONDS"} <= set(env)


def load_schema_generator() -> Any:
    """scripts/gen_chart_schema.py as a module (scripts/ is not a package)."""
    path = ROOT / "scripts" / "gen_chart_schema.py"
    spec = importlib.util.spec_from_file_location("gen_chart_schema", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schema_settings_are_exactly_the_configurable_settings() -> None:
    """values.schema.json lists every setting the chart does not manage itself."""
    generator = load_schema_generator()
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_schema = set(schema["properties"]["settings"]["properties"])
    assert in_schema == set(Settings.model_fields) - generator.CHART_MANAGED, (
        "run: python scripts/gen_chart_schema.py"
    )
    assert generator.main(["--check"]) == 0, "run: python scripts/gen_chart_schema.py"
    assert set(Settings.model_fields) >= generator.CHART_MANAGED, "a managed setting vanished"
    # Each managed setting is really set by the chart somewhere.
    everything = render(helm.parse_set_string(SET_COMBINATIONS["everything"]))
    names = set(rendered_env(everything))
    names |= set(rendered_env(render(VALUE_SETS["redis-tls"])))
    names |= set(rendered_env(render(VALUE_SETS["password"])))
    expected = {
        ("PORT" if name == "port" else f"ACTIVITY_{name.upper()}")
        for name in generator.CHART_MANAGED - {"consul_http_token"}
    }
    assert expected <= names, sorted(expected - names)


def test_rendered_config_is_accepted_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render()
    env = rendered_env(objects)
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.port == 50051
    assert settings.metrics_port == 9464
    assert settings.grace_seconds == 10
    assert settings.max_connection_age_seconds > 0, "max connection age must be on by default"
    assert settings.max_connection_age_grace_seconds > 0
    assert str(settings.data_dir) == "/var/lib/activity-events"


def test_redis_credentials_come_from_the_chart_secret() -> None:
    objects = render(VALUE_SETS["password"])
    env = rendered_env(objects)
    secret = one(objects, "Secret")
    for name, key in (
        ("ACTIVITY_REDIS_URL", "redis-url"),
        ("ACTIVITY_REDIS_PASSWORD", "redis-password"),
    ):
        ref = env[name]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] == key
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"redis-url": "rediss://redis.example:6380/0", "redis-password": "s3cret"}
    config = one(objects, "ConfigMap")
    assert not any("REDIS_URL" in k or "PASSWORD" in k for k in config["data"])


def test_existing_secret_is_used_by_name_and_no_secret_is_rendered() -> None:
    objects = render(VALUE_SETS["existing-secret"])
    env = rendered_env(objects)
    assert not [obj for obj in objects if obj["kind"] == "Secret"]
    assert env["ACTIVITY_REDIS_URL"]["secretKeyRef"] == {"name": "prod-redis", "key": "url"}
    password = env["ACTIVITY_REDIS_PASSWORD"]["secretKeyRef"]
    assert password == {"name": "prod-redis", "key": "password", "optional": True}
    annotations = server_deployment(objects)["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" in annotations


def test_dev_redis_is_off_by_default_and_wired_when_on() -> None:
    assert not [
        o
        for o in render()
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == "dev-redis"
    ]
    objects = render(load_dev_values())
    redis_service = one(objects, "Service", "dev-redis")
    redis_template = one(objects, "Deployment", "dev-redis")["spec"]["template"]
    redis_pods = redis_template["metadata"]["labels"]
    [redis_container] = redis_template["spec"]["containers"]
    args = redis_container["args"]
    for name, value in RECOMMENDED_REDIS_CONFIG.items():  # the chart repeats them literally
        assert args[args.index(f"--{name}") + 1] == value
    url = base64.b64decode(one(objects, "Secret")["data"]["redis-url"]).decode()
    assert url == f"redis://{redis_service['metadata']['name']}:6379/0"
    # The server's selectors must never pick up the Redis pod of the same release.
    for selector in (
        one(objects, "Service", "server")["spec"]["selector"],
        server_deployment(objects)["spec"]["selector"]["matchLabels"],
    ):
        assert not set(selector.items()) <= set(redis_pods.items())


def test_a_settings_change_rolls_the_pods() -> None:
    def checksums(values: dict[str, Any]) -> dict[str, str]:
        annotations = server_deployment(render(values))["spec"]["template"]["metadata"]
        return {k: v for k, v in annotations["annotations"].items() if k.startswith("checksum/")}

    base = checksums({})
    assert set(base) == {"checksum/config", "checksum/secret"}
    changed_config = checksums({"settings": {"log_level": "DEBUG"}})
    changed_secret = checksums({"redis": {"url": "redis://other:6379/0"}})
    assert changed_config["checksum/config"] != base["checksum/config"]
    assert changed_config["checksum/secret"] == base["checksum/secret"]
    assert changed_secret["checksum/secret"] != base["checksum/secret"]


# --- pod spec -------------------------------------------------------------------


def test_probes_are_native_grpc_with_the_right_services() -> None:
    objects = render()
    container = server_container(objects)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    liveness = container["livenessProbe"]["grpc"]
    readiness = container["readinessProbe"]["grpc"]
    startup = container["startupProbe"]["grpc"]
    assert liveness == {"port": grpc_port, "service": LIVENESS}
    assert startup == {"port": grpc_port, "service": LIVENESS}
    assert readiness == {"port": grpc_port, "service": "activityevents.ActivityEvents"}
    assert rendered_env(objects)["PORT"] == str(grpc_port)
    from activity_events.pb import activityevents_pb2 as pb  # noqa: PLC0415

    assert pb.DESCRIPTOR.services_by_name["ActivityEvents"].full_name == readiness["service"]


def test_http_probes_use_the_side_port() -> None:
    container = server_container(render(VALUE_SETS["http-probes"]))
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="probes"):
        chart.render({"probes": {"type": "exec"}}, name=RELEASE)


def test_security_context_is_locked_down() -> None:
    objects = render()
    pod = server_deployment(objects)["spec"]["template"]["spec"]
    container = server_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = rendered_env(objects)
    for path in ("/tmp", env["ACTIVITY_DATA_DIR"]):
        assert "emptyDir" in volumes[mounts[path]], f"{path} must be a writable emptyDir"
    limits = container["resources"]["limits"]
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
    assert "memory" in limits


def test_chart_matches_the_image() -> None:
    """User, data dir and ports agree with the Dockerfile."""
    text = DOCKERFILE.read_text()
    objects = render()
    pod = server_deployment(objects)["spec"]["template"]["spec"]
    user = re.search(r"^USER (\d+)", text, re.MULTILINE)
    assert user is not None
    assert pod["securityContext"]["runAsUser"] == int(user.group(1))
    data_dir = re.search(r"ACTIVITY_DATA_DIR=(\S+)", text)
    assert data_dir is not None
    assert rendered_env(objects)["ACTIVITY_DATA_DIR"] == data_dir.group(1)
    exposed = re.search(r"^EXPOSE (.+)$", text, re.MULTILINE)
    assert exposed is not None
    ports = {p["containerPort"] for p in server_container(objects)["ports"]}
    assert ports == {int(p) for p in exposed.group(1).split()}


def test_termination_grace_exceeds_prestop_plus_server_grace() -> None:
    for values in ({}, load_dev_values()):
        objects = render(values)
        pod = server_deployment(objects)["spec"]["template"]["spec"]
        container = server_container(objects)
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        grace = float(rendered_env(objects)["ACTIVITY_GRACE_SECONDS"])
        assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + grace


def test_replicas_spread_and_disruption_budget() -> None:
    objects = render()
    deployment = server_deployment(objects)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert "kubernetes.io/hostname" in {c["topologyKey"] for c in spread}
    selector = deployment["spec"]["selector"]["matchLabels"]
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"] == selector
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_hpa_takes_over_replicas() -> None:
    objects = render(VALUE_SETS["hpa"])
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == server_deployment(objects)["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in server_deployment(objects)["spec"]
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}


def test_services_main_and_headless() -> None:
    objects = render(VALUE_SETS["headless"])
    main = one(objects, "Service", "server")
    headless = one(objects, "Service", "headless")
    assert main["spec"]["type"] == "ClusterIP"
    assert headless["spec"]["clusterIP"] == "None"
    pod_labels = server_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    for service in (main, headless):
        assert set(service["spec"]["selector"].items()) <= set(pod_labels.items())
        assert "grpc" in {p["name"] for p in service["spec"]["ports"]}
    assert not [o for o in render() if o["metadata"]["name"].endswith("-headless")]


def test_service_monitor_is_gated_by_values_and_scrapes_metrics() -> None:
    assert not [o for o in render() if o["kind"] == "ServiceMonitor"]
    objects = render(VALUE_SETS["servicemonitor"])
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    main = one(objects, "Service", "server")
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(
        main["metadata"]["labels"].items()
    )


def test_network_policy_limits_ingress_to_the_ports() -> None:
    objects = render(VALUE_SETS["networkpolicy"])
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert [r["ports"][0]["port"] for r in rules] == ["grpc", "metrics"]
    assert rules[0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "deploy"}}}]


def mounted_file(objects: list[dict[str, Any]], path: str) -> tuple[str, str]:
    """(Secret name, key) that a file path in the server container comes from."""
    pod = server_deployment(objects)["spec"]["template"]["spec"]
    container = server_container(objects)
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            assert mount.get("readOnly") is True, f"{mount['mountPath']} must be read-only"
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            return volume["secret"]["secretName"], path[len(prefix) :]
    raise AssertionError(f"{path} is on no mounted volume")


def test_tls_files_come_from_the_secret_and_probes_leave_grpc() -> None:
    objects = render(VALUE_SETS["tls"])
    env = rendered_env(objects)
    for name, key in (
        ("ACTIVITY_TLS_CERT_FILE", "tls.crt"),
        ("ACTIVITY_TLS_KEY_FILE", "tls.key"),
        ("ACTIVITY_TLS_CLIENT_CA_FILE", "ca.crt"),
    ):
        assert mounted_file(objects, env[name]) == ("activity-events-tls", key)
    container = server_container(objects)
    # Kubernetes' grpc probe speaks plaintext only: with TLS the HTTP side port answers.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert "grpc" not in container["startupProbe"]
    hook = next(o for o in objects if o["kind"] == "Pod")
    assert "/readyz" in " ".join(hook["spec"]["containers"][0]["command"])
    plain = rendered_env(render())
    assert not any(name.startswith("ACTIVITY_TLS_") for name in plain)


def test_auth_tokens_file_comes_from_the_secret() -> None:
    objects = render(VALUE_SETS["auth"])
    env = rendered_env(objects)
    assert mounted_file(objects, env["ACTIVITY_AUTH_TOKENS_FILE"]) == ("activity-tokens", "tokens")
    assert env["ACTIVITY_AUTH_REFLECTION"] == "open"
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="existingSecret"):
        chart.render({"auth": {"enabled": True}}, name=RELEASE)


def test_redis_tls_and_username() -> None:
    objects = render(VALUE_SETS["redis-tls"])
    env = rendered_env(objects)
    assert env["ACTIVITY_REDIS_USERNAME"] == "events"
    for name, key in (
        ("ACTIVITY_REDIS_TLS_CA_FILE", "ca.crt"),
        ("ACTIVITY_REDIS_TLS_CERT_FILE", "tls.crt"),
        ("ACTIVITY_REDIS_TLS_KEY_FILE", "tls.key"),
    ):
        assert mounted_file(objects, env[name]) == ("redis-tls", key)


def test_helm_test_hook_checks_grpc_health() -> None:
    objects = render()
    pod = next(o for o in objects if o["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    service = one(objects, "Service", "server")
    assert command[:2] == ["activity-client", "health"]
    assert command[command.index("--address") + 1] == service["metadata"]["name"]
    assert command[command.index("--port") + 1] == "50051"
    assert pod["spec"]["containers"][0]["image"] == server_container(objects)["image"]


def test_image_tag_defaults_to_app_version() -> None:
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    assert server_container(render())["image"] == f"activity-events:{app_version}"
    tagged = server_container(render({"image": {"tag": "1.2.3"}}))
    assert tagged["image"] == "activity-events:1.2.3"


def test_every_value_is_commented() -> None:
    """Every value in values.yaml is documented by a comment on it or on an enclosing block."""
    undocumented: list[str] = []
    ancestors: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if match:
            indent = len(match.group(1))
            while ancestors and ancestors[-1][0] >= indent:
                ancestors.pop()
            documented = previous.startswith("#") or any(doc for _, doc in ancestors)
            is_block = match.group(3).strip() == ""
            if not documented and not is_block:
                undocumented.append(line.strip())
            ancestors.append((indent, documented))
        if line.strip():
            previous = line.strip()
    assert not undocumented, f"values without a comment: {undocumented}"
