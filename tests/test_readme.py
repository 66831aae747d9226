"""The documents stay true: the settings table (docs/settings.md) is generated
from Settings, .ci/run runs the README's test command, the README stays short
and every relative link in the documents resolves."""

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
    assert module.documented_table() == module.table(), (
        "run: python scripts/settings_table.py --write"
    )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make (\w+)\s+#", readme, flags=re.M)
    assert commands[:2] == ["run", "test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, flags=re.M)


def test_readme_is_short_and_links_resolve() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 200, "the reference belongs in docs/"
    documents = [readme, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(documents) >= 7
    for document in documents:
        text = document.read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (document.parent / target).exists(), f"{document.name} links to {target}"
        for anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", text):
            path, fragment = anchor
            linked = (document.parent / path) if path else document
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
            assert fragment in slugs, f"{document.name} links to missing #{fragment}"
