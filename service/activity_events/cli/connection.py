"""The client's channel to the server: target syntax, deadlines, call metadata.

``--address`` takes a host name or IP (``--port`` is then appended), a
``host:port``, or any gRPC target with a scheme (``dns:///svc:50051``,
``unix:/run/ae.sock``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``). For ``dns:``
targets the client asks for round-robin load balancing through the service
config, so a headless Kubernetes Service spreads calls over all replicas.

Credentials (tokens, TLS) will hang off :class:`ConnectionOptions` and
:meth:`Connection.metadata`; today the channel is plaintext.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from activity_events.cli.errors import CliError, ExitCode
from activity_events.pb import activityevents_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

#: Target prefixes gRPC resolves itself; such addresses are used unchanged.
SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:", "xds:")

#: Spreads calls over every address a dns: target resolves to.
ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

#: The server may pack many events of up to 64 KiB into one WatchEvents
#: message; gRPC's 4 MiB client default would reject such a message.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024


def build_target(address: str, port: int) -> str:
    """The gRPC target for ``--address``/``--port``.

    ``--port`` is used only when the address names a host alone: it is ignored
    for ``host:port``, ``[v6]:port`` and targets with a scheme.
    """
    address = address.strip()
    if address.startswith(SCHEMES):
        return address
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{port}"
    colons = address.count(":")
    if colons == 1:
        return address
    if colons > 1:  # a bare IPv6 address
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def channel_options(target: str) -> list[tuple[str, Any]]:
    """Channel arguments: large replies allowed, round robin for ``dns:`` targets."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    if target.startswith("dns:"):
        options.append(("grpc.service_config", ROUND_ROBIN_CONFIG))
    return options


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach the server; parsed from the common command-line flags."""

    address: str = "127.0.0.1"
    port: int = 50051
    #: Seconds to wait for the connection and for each unary call.
    timeout: float = 5.0

    @property
    def target(self) -> str:
        return build_target(self.address, self.port)


class Connection:
    """An open channel plus the ActivityEvents stub, closed on ``__exit__``."""

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.target = options.target
        self.channel = grpc.insecure_channel(self.target, options=channel_options(self.target))
        self.stub = pb_grpc.ActivityEventsStub(self.channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @property
    def timeout(self) -> float:
        return self.options.timeout

    def wait_ready(self) -> None:
        """Connect now, so that "nothing listening" is told apart from server errors.

        Raises :class:`CliError` with :attr:`ExitCode.UNAVAILABLE` when no
        connection is up within the timeout.
        """
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.timeout)
        except grpc.FutureTimeoutError:
            raise CliError(
                f"cannot reach the server at {self.target} within {self.timeout:g} s",
                ExitCode.UNAVAILABLE,
            ) from None

    def metadata(self) -> Sequence[tuple[str, str]]:
        """Metadata sent with every call: trace context now, credentials later."""
        return trace_metadata()


#: W3C Trace Context ``traceparent``: version-trace_id-parent_id-flags, lower-case hex.
TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def trace_metadata(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """W3C trace context taken from the ``TRACEPARENT``/``TRACESTATE`` environment variables.

    This is OpenTelemetry's convention for handing a trace to a command-line
    tool (a CI job or a deploy script sets them): the server's span of every
    call then joins that trace. The client records no spans of its own and
    does not import the OpenTelemetry SDK, which would cost its fast start.
    An invalid ``traceparent`` is ignored, as the W3C rules require.
    """
    env = os.environ if environ is None else environ
    parent = env.get("TRACEPARENT", "").strip()
    match = TRACEPARENT.match(parent)
    if not match:
        return []
    version, trace_id, parent_id, _ = match.groups()
    if version == "ff" or set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return []
    metadata = [("traceparent", parent)]
    state = env.get("TRACESTATE", "").strip()
    if state:
        metadata.append(("tracestate", state))
    return metadata
