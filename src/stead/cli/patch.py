"""``stead patch``: a rolling patch of the cluster through the nodes' management identities."""

from __future__ import annotations

from stead.cli.options import ConfigDirOption, SocketOption
from stead.errors import UsageError


def patch(config: ConfigDirOption = None, socket: SocketOption = None) -> None:
    """Patch every passive, switch over, patch the former active."""
    raise UsageError("stead patch is not built yet")
