"""``activity-client health``: the server's grpc.health.v1 status as an exit code.

Built for container health checks (Docker HEALTHCHECK, Kubernetes exec
probes): it answers within ``--timeout`` (2 s by default) and exits only 0
(SERVING) or 1 (anything else, nothing listening included), because Docker
reserves exit code 2. Only a malformed command line exits 2 (unreadable
``--cacert``/``--cert``/``--key`` files included). Health is open on the
server, so a probe needs no token; over TLS it takes the same ``--tls``,
``--cacert``, ``--cert``/``--key`` flags as every other command.
"""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.cli.connection import Connection, options_from_args
from activity_events.cli.console import Console
from activity_events.cli.errors import CliError, ExitCode, from_rpc_error
from activity_events.cli.formatting import json_line


def check(connection: Connection, service: str) -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``...)."""
    connection.wait_ready()
    stub = health_pb2_grpc.HealthStub(connection.channel)
    try:
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=connection.timeout,
            metadata=connection.metadata(),
        )
    except grpc.RpcError as error:
        if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        raise from_rpc_error(error, "health check failed") from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def run(args: argparse.Namespace, console: Console) -> int:
    options = options_from_args(args)
    with Connection(options) as connection:
        try:
            status = check(connection, args.service)
        except CliError as error:
            console.error(error.message)
            if args.json:
                console.data(json_line({"service": args.service, "status": "UNREACHABLE"}))
            return ExitCode.FAILED
    if args.json:
        console.data(json_line({"service": args.service, "status": status}))
    else:
        console.data(status)
    return ExitCode.OK if status == "SERVING" else ExitCode.FAILED
