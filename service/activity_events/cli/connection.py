"""The client's channel to the server: target syntax, deadlines, call metadata.

``--address`` takes a host name or IP (``--port`` is then appended), a
``host:port``, or any gRPC target with a scheme (``dns:///svc:50051``,
``unix:/run/ae.sock``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``). For ``dns:``
targets the client asks for round-robin load balancing through the service
config, so a headless Kubernetes Service spreads calls over all replicas.

Security: a bearer token (``--token``, ``--token-file`` or ``ACTIVITY_TOKEN``)
travels as ``authorization: Bearer ...`` metadata on every call; the client
sends it itself rather than through call credentials, which gRPC refuses on
plaintext channels (a mesh may terminate TLS in front of the server). TLS
(``--tls``, ``--cacert``) verifies the server, with the system roots or a
given CA bundle; ``--cert``/``--key`` add a client certificate (mutual TLS).
The token is never printed: not in errors, not in ``repr``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


#: Environment variable holding the bearer token (kept out of ``ps`` output).
TOKEN_ENV = "ACTIVITY_TOKEN"  # noqa: S105 - a variable name, not a secret

#: Environment variable that turns TLS on when set to a true value.
TLS_ENV = "ACTIVITY_TLS"

#: Printable ASCII without spaces: what an HTTP/2 header value can carry as a token.
TOKEN_TEXT = re.compile(r"^[\x21-\x7e]+$")


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach the server; parsed from the common command-line flags."""

    address: str = "127.0.0.1"
    port: int = 50051
    #: Seconds to wait for the connection and for each unary call.
    timeout: float = 5.0
    #: Bearer token sent with every call ("" = none); left out of ``repr``.
    token: str = field(default="", repr=False)
    #: Speak TLS (implied by any of the certificate fields).
    tls: bool = False
    #: PEM CA bundle that verifies the server (None = the system roots).
    root_certificates: bytes | None = field(default=None, repr=False)
    #: PEM client certificate chain and key for mutual TLS (both or neither).
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    #: Name the server certificate is checked against instead of the target's host.
    server_name: str = ""

    @property
    def target(self) -> str:
        return build_target(self.address, self.port)

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None or self.certificate_chain is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS channel credentials (system roots unless a CA bundle was given)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def _read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CliError(
            f"cannot read {flag} {path}: {error.strerror or type(error).__name__}", ExitCode.USAGE
        ) from None


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """The bearer token: --token, else --token-file's first line, else ACTIVITY_TOKEN."""
    given = getattr(args, "token", None)
    token_file = getattr(args, "token_file", None)
    if given is not None and token_file is not None:
        raise CliError("give --token or --token-file, not both", ExitCode.USAGE)
    if token_file is not None:
        lines = _read_file(token_file, "--token-file").decode("utf-8", "replace").splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise CliError(f"--token-file {token_file} holds no token", ExitCode.USAGE)
    elif given is not None:
        token = given.strip()
    else:
        token = environ.get(TOKEN_ENV, "").strip()
    if token and not TOKEN_TEXT.match(token):
        # Never echo the token: it may be a real secret with a stray character.
        raise CliError(
            "the token holds spaces or non-printable characters; it cannot be sent",
            ExitCode.USAGE,
        )
    return token


def options_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ConnectionOptions:
    """ConnectionOptions from the common flags; files are read now (unreadable: exit 2)."""
    env = os.environ if environ is None else environ
    cert, key = getattr(args, "cert", None), getattr(args, "key", None)
    if (cert is None) != (key is None):
        raise CliError("--cert and --key go together (mutual TLS needs both)", ExitCode.USAGE)
    cacert = getattr(args, "cacert", None)
    tls_env = env.get(TLS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    return ConnectionOptions(
        address=args.address,
        port=args.port,
        timeout=args.timeout,
        token=_token(args, env),
        tls=bool(getattr(args, "tls", False)) or tls_env,
        root_certificates=_read_file(cacert, "--cacert") if cacert is not None else None,
        certificate_chain=_read_file(cert, "--cert") if cert is not None else None,
        private_key=_read_file(key, "--key") if key is not None else None,
        server_name=getattr(args, "server_name", None) or "",
    )


class Connection:
    """An open channel plus the ActivityEvents stub, closed on ``__exit__``."""

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.target = options.target
        channel_args = channel_options(self.target)
        if options.secure:
            if options.server_name:
                channel_args.append(("grpc.ssl_target_name_override", options.server_name))
            self.channel = grpc.secure_channel(self.target, options.credentials(), channel_args)
        else:
            self.channel = grpc.insecure_channel(self.target, options=channel_args)
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
                f"cannot reach the server at {self.target} within {self.timeout:g} s "
                f"{self.tls_hint()}",
                ExitCode.UNAVAILABLE,
            ) from None

    def tls_hint(self) -> str:
        """A failed TLS handshake looks like an unreachable server: say what to check."""
        if self.options.secure:
            return "(TLS handshake failed? check --cacert, --cert/--key and --server-name)"
        return "(does the server use TLS? then add --tls or --cacert)"

    def metadata(self) -> Sequence[tuple[str, str]]:
        """Metadata sent with every call: trace context and the bearer token."""
        metadata = trace_metadata()
        if self.options.token:
            metadata.append(("authorization", f"Bearer {self.options.token}"))
        return metadata


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
