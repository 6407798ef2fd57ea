"""Configuration of the DNS identity backend (``[public.dns]``): RFC 2136 updates with TSIG.

Kept apart from ``stead.identity.dns`` so that the configuration schema can use it without
importing the identity package.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import PurePosixPath
from typing import Literal

import dns.exception
import dns.name
import dns.tsig
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

TsigAlgorithm = Literal[
    "hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5"
]
TSIG_ALGORITHMS: dict[str, dns.name.Name] = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-md5": dns.tsig.HMAC_MD5,
}


def dns_name(value: str, what: str) -> str:
    """An absolute DNS name in its canonical text (trailing dot), or a ValueError."""
    text = value.strip()
    if not text or text == "." or any(char.isspace() for char in text):
        raise ValueError(f"{what} {value!r} is not a DNS name")
    try:
        return dns.name.from_text(text).to_text()
    except dns.exception.DNSException as exc:
        raise ValueError(f"{what} {value!r} is not a DNS name: {exc}") from None


def host_name(value: str, what: str) -> str:
    """A name clients type: labels of letters, digits and '-'."""
    text = dns_name(value, what)
    for label in text.rstrip(".").split("."):
        if not _LABEL_RE.match(label):
            raise ValueError(f"{what} {value!r}: {label!r} is not a host name label")
    return text


class DnsSection(BaseModel):
    """Dynamic update of the public name on the zone's primary server (RFC 2136, TSIG)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str = Field(
        description="IP address of the zone's primary server (an address: the update must "
        "not depend on the DNS it changes)"
    )
    port: int = Field(default=53, ge=1, le=65535)
    zone: str = Field(description="the zone that holds the public name, e.g. example.com")
    key_name: str = Field(description="name of the TSIG key the server accepts for updates")
    key_algorithm: TsigAlgorithm = Field(default="hmac-sha256")
    key_file: str = Field(
        description="absolute path, on each node, of a file holding the key's base64 secret "
        "(or a BIND key clause, as tsig-keygen writes it)"
    )
    ttl: int = Field(
        default=30,
        ge=0,
        le=86400,
        description="TTL of the records set: resolvers may keep the old address this long "
        "after a failover",
    )
    timeout: float = Field(default=2.0, gt=0, le=60, description="seconds to wait per answer")
    public_name: str = Field(
        default="", description="the name that follows the active; default: public.fqdn"
    )

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(
                f"server {value!r} is not an IP address: give the address of the zone's "
                "primary server, not its name (the update must not depend on the DNS it "
                "changes)"
            ) from None

    @field_validator("zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return dns_name(value, "zone")

    @field_validator("key_name")
    @classmethod
    def _key_name(cls, value: str) -> str:
        return dns_name(value, "key_name")

    @field_validator("key_algorithm", mode="before")
    @classmethod
    def _algorithm(cls, value: object) -> object:
        if isinstance(value, str):  # "HMAC-SHA256", "hmac-md5.sig-alg.reg.int."
            value = value.strip().rstrip(".").lower().removesuffix(".sig-alg.reg.int")
        return value

    @field_validator("key_file")
    @classmethod
    def _key_file(cls, value: str) -> str:
        if not value or not PurePosixPath(value).is_absolute():
            raise ValueError(f"key_file {value!r} must be an absolute path")
        return value

    @field_validator("public_name")
    @classmethod
    def _public_name(cls, value: str) -> str:
        return host_name(value, "public_name") if value else value

    @model_validator(mode="after")
    def _in_zone(self) -> DnsSection:
        if self.public_name and not in_zone(self.public_name, self.zone):
            raise ValueError(f"public_name {self.public_name} is not in zone {self.zone}")
        return self

    def with_default_name(self, fqdn: str) -> DnsSection:
        """This section, with ``public_name`` set to ``fqdn`` (``public.fqdn``) if unset."""
        if self.public_name:
            return self
        if not fqdn:
            raise ValueError("dns.public_name is not set and public.fqdn is empty")
        return type(self).model_validate({**self.model_dump(), "public_name": fqdn})

    @property
    def where(self) -> str:
        """The server as "address:port", for messages."""
        if ":" in self.server:
            return f"[{self.server}]:{self.port}"
        return f"{self.server}:{self.port}"


def in_zone(name: str, zone: str) -> bool:
    return dns.name.from_text(name).is_subdomain(dns.name.from_text(zone))
