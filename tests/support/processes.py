"""Stopping child processes the tests started, by their own handle."""

from __future__ import annotations

import logging
import signal
import subprocess

logger = logging.getLogger(__name__)


def terminate(process: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """SIGTERM, wait up to ``timeout``, SIGKILL if it lingers; returns once it has exited.
    A process already gone is left alone."""
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s pid %s ignored SIGTERM; killing", what, process.pid)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=timeout)
