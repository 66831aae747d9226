"""Helpers of the reliability and security tests: certificates, process probes, status tallies.

Certificates are generated per test with the ``cryptography`` package (never
committed keys); process measurements read ``/proc`` directly so the server
exposes nothing extra for them.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from activity_events.pb import activityevents_pb2 as pb

HOSTS = ("localhost", "127.0.0.1")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass
class Authority:
    """A throwaway CA that signs server and client certificates into ``directory``."""

    directory: Path
    name: str = "test-ca"
    key: ec.EllipticCurvePrivateKey = field(init=False)
    cert: x509.Certificate = field(init=False)
    cert_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(_name(self.name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = _write_cert(self.cert, self.directory / f"{self.name}.pem")

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        """(certificate file, key file) for ``name``; server certificates cover HOSTS."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return (
            _write_cert(cert, self.directory / f"{name}.pem"),
            _write_key(key, self.directory / f"{name}.key"),
        )


def secure_channel(
    port: int,
    ca_file: Path,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    *,
    host: str = "localhost",
) -> grpc.aio.Channel:
    """An aio TLS channel to 127.0.0.1:port that checks the server against ``ca_file``."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        credentials,
        options=[("grpc.ssl_target_name_override", host)],
    )


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` from /proc (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """Open file descriptors of process ``pid``."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class StatusTally:
    """Counts of the status codes a workload saw, printable for the results notes."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, code: grpc.StatusCode) -> None:
        self.counts[code.name] += 1

    def seen(self) -> set[str]:
        return set(self.counts)

    def __str__(self) -> str:
        return ", ".join(f"{name}={count}" for name, count in sorted(self.counts.items()))


def event(deployment_id: int, event_id: int, message: str = "") -> pb.EventRequest:
    """A CreateEvent request with a deterministic message (so retries are true duplicates)."""
    return pb.EventRequest(
        id=event_id,
        deployment_id=deployment_id,
        message=message or f"deployment {deployment_id} event {event_id}",
    )
