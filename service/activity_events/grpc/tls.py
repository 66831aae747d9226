"""TLS and mutual TLS for the gRPC port.

Plaintext stays the default (local use, or TLS terminated by a mesh). With
``tls_cert_file`` and ``tls_key_file`` set the port speaks TLS only; with
``tls_client_ca_file`` as well, every client must present a certificate
signed by that CA (mutual TLS) or the handshake fails. The files are read
once at start-up; a missing or unreadable file stops the start with a clear
error rather than silently serving plaintext.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from activity_events.app.settings import Settings

logger = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """The TLS settings are incomplete or name files that cannot be read."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise TlsConfigError(f"{what} {path} is empty")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for the gRPC port, or ``None`` for plaintext (no certificate set)."""
    cert, key, client_ca = (
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
    )
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigError(
                "ACTIVITY_TLS_CLIENT_CA_FILE needs ACTIVITY_TLS_CERT_FILE and ACTIVITY_TLS_KEY_FILE"
            )
        return None
    if cert is None or key is None:
        raise TlsConfigError(
            "ACTIVITY_TLS_CERT_FILE and ACTIVITY_TLS_KEY_FILE must be set together"
        )
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    if client_ca is None:
        logger.info("gRPC port uses TLS (certificate %s)", cert)
        return grpc.ssl_server_credentials([pair])
    logger.info("gRPC port uses mutual TLS (certificate %s, client CA %s)", cert, client_ca)
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=_read(client_ca, "TLS client CA"),
        require_client_auth=True,
    )


def add_port(server: grpc.aio.Server, address: str, settings: Settings) -> int:
    """Bind ``address`` with TLS when configured, else plaintext; the bound port (0 = failed)."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)
