"""The public identity: what makes clients reach the active node (see ``base``).

``make_identity`` builds the backends the configuration asks for; ``Hooks`` runs the
operator's commands around each role change.
"""

from __future__ import annotations

from pathlib import Path

from stead.config.schema import ClusterConfig, PublicAddress, PublicSection
from stead.errors import IdentityError
from stead.identity.base import (
    CompositeIdentity,
    IdentityBackend,
    NullIdentity,
    StateFile,
)
from stead.identity.hooks import PHASES, Hooks, Phase
from stead.identity.linux import LinuxHost

LINUX_STATE_FILE = "identity-linux.json"
MANAGEMENT_STATE_FILE = "identity-management.json"
DNS_STATE_FILE = "identity-dns.json"

__all__ = [
    "LINUX_STATE_FILE",
    "PHASES",
    "CompositeIdentity",
    "Hooks",
    "IdentityBackend",
    "IdentityError",
    "LinuxHost",
    "NullIdentity",
    "Phase",
    "StateFile",
    "make_identity",
    "make_management",
]


def make_identity(config: ClusterConfig, state_dir: Path, me: str | None = None) -> IdentityBackend:
    """The identity this cluster configures, or a stand-in that does nothing.

    A Linux state file left by an earlier configuration keeps the Linux backend, even with
    nothing configured now, so that ``release`` still undoes what it recorded.
    """
    from stead.identity.dns import DnsIdentity  # dnspython only when DNS is configured

    public = config.public
    state_file = Path(state_dir) / LINUX_STATE_FILE
    backends: list[IdentityBackend] = []
    if public.hostname or public.addresses or state_file.exists():
        backends.append(LinuxHost(public, state_file))
    if public.dns is not None and me is not None:
        node = config.node(me)
        published = node.public_addresses or [a.address for a in public.addresses]
        backends.append(
            DnsIdentity(
                public.dns.with_default_name(public.fqdn),
                published,
                Path(state_dir) / DNS_STATE_FILE,
            )
        )
    return CompositeIdentity(backends) if backends else NullIdentity()


def make_management(config: ClusterConfig, me: str, state_dir: Path) -> IdentityBackend:
    """This node's own identity (``nodes.management``): its host name and management
    address, taken at agent start and kept. While the node is active, the public identity
    is taken over it and gives the management host name back on release."""
    management = config.node(me).management
    if management is None:
        return NullIdentity()
    addresses = (
        [PublicAddress(address=management.address, interface=management.interface)]
        if management.address
        else []
    )
    own = PublicSection(hostname=management.hostname, addresses=addresses)
    return LinuxHost(own, Path(state_dir) / MANAGEMENT_STATE_FILE)
