"""The settings table of docs/settings.md, generated from the Settings model.

``python scripts/settings_table.py`` prints it; ``--write`` replaces the block
between the document's settings markers; tests/test_readme.py fails when the
document's table is not what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import AliasChoices

from activity_events.app.settings import Settings


def env_names(name: str) -> list[str]:
    field = Settings.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(a) for a in alias.choices]
    return [f"ACTIVITY_{name.upper()}"]


START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name == "data_dir":
            shown = "`~/.local/share/activity-events`"
        elif field.default is None:
            shown = "unset"
        elif field.default == "":
            shown = "empty"
        else:
            shown = f"`{field.default}`"
        names = " / ".join(f"`{n}`" for n in env_names(name))
        lines.append(f"| {names} | {shown} | {field.description or ''} |")
    return "\n".join(lines) + "\n"


def documented_table() -> str:
    text = DOCUMENT.read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip("\n") + "\n"


def main() -> None:
    if "--write" in sys.argv:
        text = DOCUMENT.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        DOCUMENT.write_text(f"{head}{START}\n{table()}{END}{tail}")
    else:
        print(table(), end="")


if __name__ == "__main__":
    main()
