"""py-spy recording of the server while a scenario runs, and a summary of it.

``--py-spy DIR`` (with ``--spawn``) attaches ``py-spy record`` to the server
PID during the measured phase of each scenario run (not while history is
preloaded) and writes folded stacks
(``DIR/<scenario>-<run>.folded``; flamegraph tools read them) plus a text
summary of the functions with the most samples, by own time and including
callees. Idle samples are not recorded, so percentages are of busy time.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_RATE_HZ = 200
_STOP_TIMEOUT_S = 60.0
_ATTACH_S = 0.3
_LINE_NO = re.compile(r":\d+\)$")


def py_spy_path() -> str | None:
    """py-spy next to this interpreter (a venv install) or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Recorder:
    """A ``py-spy record`` of ``pid`` from `start` to `stop` (the measured phase).

    With ``native`` py-spy also unwinds C frames (gRPC core, uvloop, hiredis),
    which otherwise count as the Python frame that called into them (often the
    event loop's ``Runner.run``).
    """

    def __init__(self, pid: int, output: Path, *, native: bool = False) -> None:
        executable = py_spy_path()
        if executable is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.output = output
        self._argv = [
            executable, "record",
            "--pid", str(pid),
            "--rate", str(_RATE_HZ),
            "--format", "raw",
            "--output", str(output),
            *(["--native"] if native else ["--nonblocking"]),
        ]  # fmt: skip
        self._process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    def start(self) -> None:
        if self._process is not None:
            return
        self._log = self.output.with_suffix(".log").open("wb")
        self._process = subprocess.Popen(
            self._argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        time.sleep(_ATTACH_S)  # py-spy needs a moment to attach before the phase begins

    def stop(self) -> None:
        """SIGINT makes py-spy write its output and exit; killed if it does not."""
        if self._process is None or self._log is None:
            return
        try:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGINT)
                try:
                    self._process.wait(timeout=_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=5)
        finally:
            self._log.close()


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``."""
    frame = _LINE_NO.sub(")", frame)
    name, _, location = frame.partition(" (")
    return f"{name} ({Path(location.rstrip(')')).name})" if location else name


def top_functions(folded: Path, limit: int = 20) -> tuple[int, list[tuple[str, float, float]]]:
    """Total samples and the top functions as (name, own %, including-callees %)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        # The first frame is the thread ("process ... thread ..."): not a function.
        functions = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not functions:
            continue
        total += count
        own[functions[-1]] += count
        for name in set(functions):
            inclusive[name] += count
    ranked = sorted(own, key=lambda n: (own[n], inclusive[n]), reverse=True)[:limit]
    return total, [
        (name, round(100.0 * own[name] / total, 1), round(100.0 * inclusive[name] / total, 1))
        for name in ranked
    ]


def summary(folded: Path, limit: int = 20) -> str:
    """A text table of `top_functions`, also written next to the folded file."""
    if not folded.exists():
        return f"(no profile written to {folded})"
    total, rows = top_functions(folded, limit)
    lines = [f"{folded.name}: {total} busy samples at {_RATE_HZ} Hz", "  own%  incl%  function"]
    lines += [f"{own:6.1f} {incl:6.1f}  {name}" for name, own, incl in rows]
    text = "\n".join(lines)
    folded.with_suffix(".top.txt").write_text(text + "\n")
    return text
