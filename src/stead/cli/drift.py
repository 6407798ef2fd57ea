"""``stead drift``: what differs between the active and each passive outside the protected set."""

from __future__ import annotations

from stead.cli.options import ConfigDirOption, SocketOption
from stead.errors import UsageError


def drift(config: ConfigDirOption = None, socket: SocketOption = None) -> None:
    """Compare installed packages and system trees of the active and each passive."""
    raise UsageError("stead drift is not built yet")
