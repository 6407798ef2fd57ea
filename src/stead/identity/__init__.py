"""The public identity: what makes clients reach the active node (see ``base``).

``make_identity`` builds the backends the configuration asks for; ``Hooks`` runs the
operator's commands around each role change.
"""

from __future__ import annotations

from pathlib import Path

from stead.config.schema import ClusterConfig
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
]


def make_identity(config: ClusterConfig, state_dir: Path) -> IdentityBackend:
    """The identity this cluster configures, or a stand-in that does nothing.

    A Linux state file left by an earlier configuration keeps the Linux backend, even with
    nothing configured now, so that ``release`` still undoes what it recorded.
    """
    public = config.public
    state_file = Path(state_dir) / LINUX_STATE_FILE
    if not public.hostname and not public.addresses and not state_file.exists():
        return NullIdentity()
    return CompositeIdentity([LinuxHost(public, state_file)])
