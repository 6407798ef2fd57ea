"""The cluster PKI: what the certificates say and how secrets reach the disk."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from stead import pki
from stead.errors import UsageError


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.create_ca("lab")


def test_ca_is_a_ca(ca: tuple[bytes, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(ca[0])
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert "lab" in pki.cert_common_name(ca[0])
    assert serialization.load_pem_private_key(ca[1], password=None)


def test_node_cert_names_and_usage(ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = pki.issue_node_cert(ca[0], ca[1], "primary", ["198.18.0.1", "fd00::1"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca[0]))
    assert pki.cert_common_name(cert_pem) == "primary"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["primary"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("198.18.0.1"),
        ipaddress.ip_address("fd00::1"),
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert pki.cert_serial(cert_pem) == cert.serial_number
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == cert.public_key()


def test_der_is_accepted(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = pki.issue_node_cert(ca[0], ca[1], "secondary", [])
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert pki.cert_common_name(der) == "secondary"
    assert pki.cert_serial(der) == pki.cert_serial(cert_pem)


def test_serials_differ(ca: tuple[bytes, bytes]) -> None:
    first, _ = pki.issue_node_cert(ca[0], ca[1], "primary", [])
    second, _ = pki.issue_node_cert(ca[0], ca[1], "primary", [])
    assert pki.cert_serial(first) != pki.cert_serial(second)


def test_operator_cert(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = pki.issue_client_cert(ca[0], ca[1], "alice")
    assert pki.cert_common_name(cert_pem) == "operator:alice"


@pytest.mark.parametrize(
    ("node", "addresses"),
    [("", []), ("operator:x", []), ("primary", ["not-an-ip"])],
)
def test_bad_node_requests_are_refused(
    ca: tuple[bytes, bytes], node: str, addresses: list[str]
) -> None:
    with pytest.raises(UsageError):
        pki.issue_node_cert(ca[0], ca[1], node, addresses)


def test_garbage_is_not_a_certificate() -> None:
    with pytest.raises(UsageError):
        pki.cert_serial(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_write_private_is_0600_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "node.key"
    target.write_bytes(b"old")
    target.chmod(0o644)
    pki.write_private(target, b"secret")
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temp file left behind
