"""tilt/Tiltfile, evaluated by a real Starlark interpreter with stubbed Tilt builtins.

No Tilt or cluster runs here. ``starlark-pyo3`` (the Rust Starlark
implementation Tilt's dialect follows) executes the Tiltfile; every Tilt
builtin it calls is a Python stub with Tilt's documented parameter names, so
a misspelled argument or an unknown builtin fails the evaluation. The
recorded calls are then checked against the repository: every path exists,
the image built is the image the chart deploys (rendered by the Helm SDK
with the same values file), and resources, ports and dependencies line up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import starlark
import yaml

pytestmark = pytest.mark.tools

ROOT = Path(__file__).resolve().parent.parent
TILT_DIR = ROOT / "tilt"
TILTFILE = TILT_DIR / "Tiltfile"
DOCKERFILE = ROOT / "Dockerfile"

TRIGGER_MODE_AUTO = 0
TRIGGER_MODE_MANUAL = 1


@dataclass
class Recorder:
    """Calls the Tiltfile made, by builtin name."""

    calls: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def record(self, builtin: str, /, **arguments: Any) -> dict[str, Any]:
        entry = {"builtin": builtin, **arguments}
        self.calls.setdefault(builtin, []).append(entry)
        return entry

    def only(self, name: str) -> dict[str, Any]:
        found = self.calls.get(name, [])
        assert len(found) == 1, f"expected one {name}() call, got {len(found)}"
        return found[0]


def tilt_builtins(recorder: Recorder) -> dict[str, Callable[..., Any]]:
    """Stubs with the parameter names of Tilt's API reference (docs.tilt.dev/api.html)."""

    def docker_build(  # noqa: PLR0917 - Tilt's positional signature
        ref: str,
        context: str,
        build_args: dict[str, str] | None = None,
        dockerfile: str = "Dockerfile",
        dockerfile_contents: str = "",
        live_update: list[Any] | None = None,
        match_in_env_vars: bool = False,
        ignore: list[str] | None = None,
        only: list[str] | None = None,
        entrypoint: list[str] | str | None = None,
        target: str = "",
        ssh: str = "",
        network: str = "",
        secret: str = "",
        extra_tag: str = "",
        container_args: list[str] | None = None,
        cache_from: list[str] | None = None,
        pull: bool = False,
        platform: str = "",
        extra_hosts: list[str] | None = None,
    ) -> None:
        recorder.record(
            "docker_build",
            ref=ref,
            context=context,
            dockerfile=dockerfile,
            dockerfile_contents=dockerfile_contents,
            live_update=live_update or [],
            ignore=ignore or [],
            only=only or [],
            entrypoint=entrypoint,
            target=target,
        )

    def sync(local_path: str, remote_path: str) -> dict[str, Any]:
        return recorder.record("sync", local_path=local_path, remote_path=remote_path)

    def run(cmd: str, trigger: list[str] | str | None = None, echo_off: bool = False) -> Any:
        triggers = [trigger] if isinstance(trigger, str) else list(trigger or [])
        return recorder.record("run", cmd=cmd, trigger=triggers)

    def fall_back_on(files: list[str] | str) -> dict[str, Any]:
        return recorder.record("fall_back_on", files=[files] if isinstance(files, str) else files)

    def helm_(  # noqa: PLR0917 - Tilt's positional signature
        pathToChartDir: str,
        name: str = "",
        namespace: str = "",
        values: list[str] | str | None = None,
        set: list[str] | str | None = None,
        kube_version: str = "",
        skip_crds: bool = False,
    ) -> dict[str, Any]:
        value_files = [values] if isinstance(values, str) else list(values or [])
        sets = [set] if isinstance(set, str) else list(set or [])
        return recorder.record(
            "helm",
            chart=pathToChartDir,
            name=name,
            namespace=namespace,
            values=value_files,
            set=sets,
        )

    def k8s_yaml(yaml: Any, allow_duplicates: bool = False) -> None:
        recorder.record("k8s_yaml", yaml=yaml)

    def port_forward(
        local_port: int,
        container_port: int | None = None,
        name: str | None = None,
        link_path: str | None = None,
        host: str | None = None,
    ) -> dict[str, Any]:
        return {"local": local_port, "container": container_port or local_port, "name": name}

    def k8s_resource(  # noqa: PLR0917 - Tilt's positional signature
        workload: str = "",
        new_name: str = "",
        port_forwards: list[Any] | Any = None,
        extra_pod_selectors: Any = None,
        trigger_mode: int = TRIGGER_MODE_AUTO,
        resource_deps: list[str] | None = None,
        objects: list[str] | None = None,
        auto_init: bool = True,
        pod_readiness: str = "",
        links: list[Any] | None = None,
        labels: list[str] | str | None = None,
        discovery_strategy: str = "",
    ) -> None:
        forwards = port_forwards if isinstance(port_forwards, list) else [port_forwards]
        recorder.record(
            "k8s_resource",
            workload=workload,
            port_forwards=[f for f in forwards if f is not None],
            resource_deps=resource_deps or [],
        )

    def local_resource(  # noqa: PLR0917 - Tilt's positional signature
        name: str,
        cmd: str | list[str] = "",
        deps: list[str] | str | None = None,
        trigger_mode: int = TRIGGER_MODE_AUTO,
        resource_deps: list[str] | None = None,
        ignore: list[str] | str | None = None,
        auto_init: bool = True,
        serve_cmd: str = "",
        cmd_bat: str = "",
        serve_cmd_bat: str = "",
        allow_parallel: bool = False,
        links: list[Any] | None = None,
        tags: list[str] | None = None,
        env: dict[str, str] | None = None,
        serve_env: dict[str, str] | None = None,
        readiness_probe: Any = None,
        dir: str = "",
        serve_dir: str = "",
        labels: list[str] | str | None = None,
    ) -> None:
        recorder.record(
            "local_resource",
            name=name,
            cmd=cmd,
            deps=[deps] if isinstance(deps, str) else list(deps or []),
            resource_deps=resource_deps or [],
            dir=dir,
            trigger_mode=trigger_mode,
        )

    return {
        "docker_build": docker_build,
        "sync": sync,
        "run": run,
        "fall_back_on": fall_back_on,
        "helm": helm_,
        "k8s_yaml": k8s_yaml,
        "port_forward": port_forward,
        "k8s_resource": k8s_resource,
        "local_resource": local_resource,
    }


def restart_process_extension(
    builtins: dict[str, Callable[..., Any]], recorder: Recorder
) -> starlark.FrozenModule:
    """``ext://restart_process``, reduced to what it does with its arguments.

    The real extension (tilt-extensions/restart_process) declares
    ``docker_build(ref + base_suffix, context, **kwargs)`` for the image and a
    thin child image named ``ref`` that wraps ``entrypoint`` and writes
    ``restart_file`` at the end of every live update.
    """

    def docker_build_with_restart(  # noqa: PLR0917 - Tilt's positional signature
        ref: str,
        context: str,
        entrypoint: list[str] | str,
        live_update: list[Any],
        base_suffix: str = "-base",
        restart_file: str = "/tmp/.restart-proc",
        **kwargs: Any,
    ) -> None:
        assert live_update, "docker_build_with_restart needs live_update steps"
        recorder.record(
            "docker_build_with_restart",
            ref=ref,
            context=context,
            entrypoint=entrypoint,
            restart_file=restart_file,
            kwargs=kwargs,
        )
        builtins["docker_build"](ref + base_suffix, context, **kwargs)
        child_kwargs = {k: v for k, v in kwargs.items() if k not in {"dockerfile", "target"}}
        wrapped = ["/tilt-restart-wrapper", f"--watch_file={restart_file}"] + (
            list(entrypoint) if isinstance(entrypoint, list) else ["sh", "-c", entrypoint]
        )
        restart = builtins["run"](f"date > {restart_file}")
        builtins["docker_build"](
            ref,
            context,
            entrypoint=wrapped,
            dockerfile_contents="FROM " + ref + base_suffix,
            live_update=[*live_update, restart],
            **child_kwargs,
        )

    module = starlark.Module()
    module.add_callable("docker_build_with_restart", docker_build_with_restart)
    return module.freeze()


def evaluate_tiltfile() -> Recorder:
    recorder = Recorder()
    builtins = tilt_builtins(recorder)
    module = starlark.Module()
    for name, function in builtins.items():
        module.add_callable(name, function)
    module["TRIGGER_MODE_AUTO"] = TRIGGER_MODE_AUTO
    module["TRIGGER_MODE_MANUAL"] = TRIGGER_MODE_MANUAL

    def load(module_id: str) -> starlark.FrozenModule:
        if module_id == "ext://restart_process":
            return restart_process_extension(builtins, recorder)
        raise AssertionError(f"Tiltfile loads an unexpected module {module_id}")

    ast = starlark.parse(str(TILTFILE), TILTFILE.read_text(), starlark.Dialect.extended())
    starlark.eval(module, ast, starlark.Globals.standard(), starlark.FileLoader(load))
    return recorder


def base_build(tilt: Recorder) -> dict[str, Any]:
    """The docker_build of the Dockerfile itself (the restart wrapper builds on it)."""
    [build] = [b for b in tilt.calls["docker_build"] if not b["dockerfile_contents"]]
    return build


def child_build(tilt: Recorder) -> dict[str, Any]:
    """The image Tilt deploys: the base plus the restart wrapper and live update."""
    ref = tilt.only("docker_build_with_restart")["ref"]
    [build] = [b for b in tilt.calls["docker_build"] if b["ref"] == ref]
    return build


@pytest.fixture(scope="module")
def tilt() -> Recorder:
    return evaluate_tiltfile()


def tilt_path(relative: str, base: Path = TILT_DIR) -> Path:
    return (base / relative).resolve()


def dockerfile_stage(name: str) -> str:
    """The text of one Dockerfile stage."""
    text = DOCKERFILE.read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no stage {name} in the Dockerfile"
    return match.group(1)


def rendered_objects(tilt: Recorder) -> list[dict[str, Any]]:
    """The chart rendered the way the Tiltfile's helm() call renders it."""
    call = tilt.only("helm")
    values: dict[str, Any] = {}
    for file in call["values"]:
        loaded = yaml.safe_load(tilt_path(file).read_text()) or {}
        values = merge(values, loaded)
    for expression in call["set"]:
        values = merge(values, helm.parse_set_string(expression))
    with helm.Chart.load(tilt_path(call["chart"])) as chart:
        manifests = chart.render(
            values, name=call["name"], namespace=call["namespace"] or "default"
        )
    objects = []
    for path, text in manifests.items():
        if not path.endswith("NOTES.txt"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- tests ---------------------------------------------------------------------------


def test_tiltfile_evaluates_with_only_known_builtins(tilt: Recorder) -> None:
    assert set(tilt.calls) >= {"docker_build", "helm", "k8s_yaml", "k8s_resource", "local_resource"}
    assert tilt.only("k8s_yaml")["yaml"] == tilt.only("helm"), (
        "k8s_yaml must deploy helm()'s output"
    )


def test_a_misspelled_argument_fails_the_evaluation(tmp_path: Path) -> None:
    """The stubs are strict: the evaluation above would catch a wrong keyword."""
    recorder = Recorder()
    module = starlark.Module()
    for name, function in tilt_builtins(recorder).items():
        module.add_callable(name, function)
    ast = starlark.parse(
        "bad", "k8s_resource('x', port_forward=['1:1'])", starlark.Dialect.extended()
    )
    with pytest.raises(Exception, match="port_forward"):
        starlark.eval(module, ast, starlark.Globals.standard())


def test_every_referenced_path_exists(tilt: Recorder) -> None:
    build = base_build(tilt)
    context = tilt_path(build["context"])
    assert context == ROOT
    paths = [tilt_path(build["dockerfile"])]
    paths += [context / entry for entry in build["only"]]
    paths += [tilt_path(step["local_path"]) for step in tilt.calls.get("sync", [])]
    paths += [tilt_path(t) for step in tilt.calls.get("run", []) for t in step["trigger"]]
    helm_call = tilt.only("helm")
    paths += [tilt_path(helm_call["chart"])] + [tilt_path(v) for v in helm_call["values"]]
    for resource in tilt.calls["local_resource"]:
        base = tilt_path(resource["dir"]) if resource["dir"] else TILT_DIR
        paths.append(base)
        paths += [tilt_path(dep) for dep in resource["deps"]]
    missing = [str(p) for p in paths if not p.exists()]
    assert not missing, f"Tiltfile references missing paths: {missing}"
    assert len(paths) >= 10


def test_it_builds_the_image_the_chart_deploys(tilt: Recorder) -> None:
    image = child_build(tilt)["ref"]
    assert base_build(tilt)["ref"] == image + "-base"
    deployed = {
        container["image"]
        for obj in rendered_objects(tilt)
        if obj["kind"] == "Deployment"
        for container in obj["spec"]["template"]["spec"]["containers"]
    }
    # Tilt swaps in its build for any tag of the same repository.
    repositories = {ref.rsplit(":", 1)[0] for ref in deployed}
    assert image in repositories, f"the chart deploys {deployed}, Tilt builds {image}"


def test_build_target_entrypoint_and_live_update_fit_the_dockerfile(tilt: Recorder) -> None:
    build = base_build(tilt)
    dev = dockerfile_stage(build["target"])
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert entrypoint is not None
    image_entrypoint = yaml.safe_load(entrypoint.group(1))
    assert tilt.only("docker_build_with_restart")["entrypoint"] == image_entrypoint
    assert child_build(tilt)["entrypoint"][-len(image_entrypoint) :] == image_entrypoint
    assert "--editable /src" in dev, "live update syncs into /src: the dev stage must install it"
    assert "chown -R 10001:10001 /src /opt/venv" in dev
    for step in tilt.calls["sync"]:
        assert step["remote_path"].startswith("/src/")
    restart_file = tilt.only("docker_build_with_restart")["restart_file"]
    assert restart_file.startswith("/src/"), "the restart file must be writable by the image's user"
    [reinstall] = [s for s in tilt.calls["run"] if s["trigger"]]
    assert "pip install" in reinstall["cmd"] and "/src" in reinstall["cmd"]
    assert any(t.endswith("pyproject.toml") for t in reinstall["trigger"])


def test_resources_ports_and_dependencies_line_up(tilt: Recorder) -> None:
    objects = rendered_objects(tilt)
    workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    resources = {r["workload"]: r for r in tilt.calls["k8s_resource"]}
    locals_ = {r["name"] for r in tilt.calls["local_resource"]}
    assert set(resources) <= set(workloads), (
        f"k8s_resource names no rendered Deployment: {resources}"
    )
    for name, resource in resources.items():
        container_ports = {
            port["containerPort"]
            for container in workloads[name]["spec"]["template"]["spec"]["containers"]
            for port in container["ports"]
        }
        for forward in resource["port_forwards"]:
            assert forward["container"] in container_ports, (name, forward)
        for dependency in resource["resource_deps"]:
            assert dependency in resources or dependency in locals_, dependency
    server = next(r for r in resources.values() if r["resource_deps"])
    forwarded = {f["container"] for f in server["port_forwards"]}
    assert forwarded == {50051, 9464}, "gRPC and metrics must be forwarded"
    redis = workloads[server["resource_deps"][0]]
    assert redis["metadata"]["labels"]["app.kubernetes.io/component"] == "dev-redis"
    local_ports = [f["local"] for r in resources.values() for f in r["port_forwards"]]
    assert 6379 not in local_ports, "6379 is a developer's local Redis"
    assert len(local_ports) == len(set(local_ports))


def test_local_resources_for_tests_and_stubs(tilt: Recorder) -> None:
    resources = {r["name"]: r for r in tilt.calls["local_resource"]}
    stubs = next(r for r in resources.values() if any(d.endswith(".proto") for d in r["deps"]))
    assert stubs["cmd"] == "make proto"
    assert re.search(r"^proto:", (ROOT / "Makefile").read_text(), re.MULTILINE)
    tests = next(r for r in resources.values() if "pytest" in r["cmd"])
    assert tests["trigger_mode"] == TRIGGER_MODE_MANUAL
    assert tilt_path(tests["dir"]) == ROOT
    for resource in resources.values():
        for dependency in resource["resource_deps"]:
            assert dependency in resources


def test_dev_values_keep_the_dev_loop_working(tilt: Recorder) -> None:
    objects = rendered_objects(tilt)
    assert not [o for o in objects if o["kind"] == "Pod"], "no helm test pod under Tilt"
    server = next(
        o
        for o in objects
        if o["kind"] == "Deployment"
        and o["metadata"]["labels"].get("app.kubernetes.io/component") == "server"
    )
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is False, (
        "live update writes into the container"
    )
    assert "command" not in container, "the image's (Tilt-wrapped) entrypoint must run"
