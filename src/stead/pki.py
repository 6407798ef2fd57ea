"""The cluster's small PKI: one CA per cluster, one certificate per node and per operator.

Every channel is mutual TLS against the cluster CA, so a node proves who it is with its
certificate (common name = node name) and a stolen or retired certificate is shut out by
its serial number (the revoked set in the cluster configuration). Keys are EC P-256: every
OpenSSL that Python's ``ssl`` links against accepts them for TLS 1.3.

Duties:

- Timing: none. Generating a key takes milliseconds; callers may run it in a thread.
- Atomicity: :func:`write_private` creates the file with mode 0600 before a single byte of
  the key is written and replaces the target by rename, so a key is never readable by others
  and never half written, even after a crash.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stead.errors import UsageError
from stead.fsutil import write_atomic

OPERATOR_PREFIX = "operator:"
# Certificates are valid from a little before "now" so that a peer whose clock lags a
# few minutes does not refuse a freshly issued certificate.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


def create_ca(cluster_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """Create the cluster CA; returns ``(ca_cert_pem, ca_key_pem)``."""
    if not cluster_name:
        raise UsageError("the cluster name must not be empty")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"stead CA {cluster_name}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"stead cluster {cluster_name}"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_node_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    node_name: str,
    addresses: list[str],
    days: int = 825,
) -> tuple[bytes, bytes]:
    """Issue a node certificate; returns ``(cert_pem, key_pem)``.

    CN is the node name; the SAN holds the node name as DNS name and every address as an IP
    address, so the certificate is also valid for tools that check host names.
    """
    if not node_name or node_name.startswith(OPERATOR_PREFIX):
        raise UsageError(f"invalid node name {node_name!r}")
    sans: list[x509.GeneralName] = [x509.DNSName(node_name)]
    for address in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            raise UsageError(f"{address!r} is not an IP address") from None
    return _issue(ca_cert_pem, ca_key_pem, node_name, sans, days)


def issue_client_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, operator: str, days: int = 825
) -> tuple[bytes, bytes]:
    """Issue an operator (CLI) certificate with CN ``operator:NAME``; returns (cert, key)."""
    if not operator:
        raise UsageError("the operator name must not be empty")
    return _issue(ca_cert_pem, ca_key_pem, OPERATOR_PREFIX + operator, [], days)


def cert_serial(cert: bytes) -> int:
    """Serial number of a PEM or DER certificate (what the revoked set lists)."""
    return _load(cert).serial_number


def cert_common_name(cert: bytes) -> str:
    """Common name of a PEM or DER certificate ("" when it has none)."""
    attrs = _load(cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return ""
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a secret (a private key) with mode 0600, atomically (temp file, fsync, rename)."""
    write_atomic(path, data, 0o600)


def _issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    sans: list[x509.GeneralName],
    days: int,
) -> tuple[bytes, bytes]:
    ca_cert = _load(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise UsageError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load(cert: bytes) -> x509.Certificate:
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise UsageError(f"not a certificate: {exc}") from None
