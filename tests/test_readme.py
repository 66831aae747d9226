"""The README stays true: its settings table is generated from Settings, and
.ci/run runs the README's test command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _settings_table_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "settings_table", ROOT / "scripts" / "settings_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_table_is_fresh() -> None:
    module = _settings_table_module()
    assert module.readme_table() == module.table(), "run: python scripts/settings_table.py --write"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make (\w+)\s+#", readme, flags=re.M)
    assert commands[:2] == ["run", "test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, flags=re.M)
