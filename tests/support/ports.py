"""Free TCP ports for servers started by the tests."""

from __future__ import annotations

import socket

#: The machine's own Redis listens here; tests must never talk to it.
RESERVED_PORTS = frozenset({6379})


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago.

    The kernel picks it (bind to port 0), so concurrent test runs rarely
    collide; the small race between closing the probe socket and the real
    server binding is accepted, as in most test suites.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port
    raise RuntimeError("no free port found")


def port_is_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
