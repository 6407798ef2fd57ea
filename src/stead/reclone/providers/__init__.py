"""Clone providers: how a passive is rebuilt from the active (see :mod:`.base`).

``builtin`` rebuilds the node's trees over the channel; ``libvirt`` clones the active's
virtual machine (:mod:`stead.reclone.providers.libvirt`, which needs ``libvirt-python`` and
is imported only when configured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stead.errors import RecloneError
from stead.reclone.providers.base import (
    CloneProvider,
    CloneResult,
    Generation,
    Progress,
    ProviderPlan,
    no_progress,
)
from stead.reclone.providers.builtin import BuiltinBackend, BuiltinProvider

if TYPE_CHECKING:
    from stead.reclone.providers.libvirt import LibvirtProvider


def libvirt_provider_class() -> type[LibvirtProvider]:
    """The libvirt provider, imported on demand: ``libvirt-python`` is needed only there."""
    try:
        from stead.reclone.providers.libvirt import LibvirtProvider
    except ImportError as exc:
        raise RecloneError(
            f"the libvirt provider needs libvirt-python ({exc}): apt-get install libvirt-dev "
            "pkg-config gcc python3-dev, then pip install libvirt-python==12.8.0"
        ) from exc
    return LibvirtProvider


__all__ = [
    "BuiltinBackend",
    "BuiltinProvider",
    "CloneProvider",
    "CloneResult",
    "Generation",
    "Progress",
    "ProviderPlan",
    "libvirt_provider_class",
    "no_progress",
]
