"""What lies outside the protected set: system trees and installed packages.

The protected set is replicated change by change; the rest of a node (``/etc``, ``/opt``,
``/usr/local`` and the installed packages, as ``[system]`` configures them) is copied only
by a reclone, so it may drift apart between nodes. This package says what a node holds
there and how two nodes differ:

- :mod:`stead.system.manifest`: walk the system trees into a :class:`SystemManifest` (type,
  mode, owner, size, symlink target and a BLAKE3 digest per path);
- :mod:`stead.system.packages`: the installed packages (dpkg or rpm);
- :mod:`stead.system.compare`: the pure comparison of two of each, a :class:`Drift`;
- :mod:`stead.system.snapshot`: both together as one :class:`Snapshot`, its wire form
  (msgpack, zstd) and the pages a peer serves it in over a heartbeat link;
- :mod:`stead.system.drift`: ``stead drift`` as the active runs it, against every passive.

``stead drift`` uses all of it; a reclone reuses the manifest and the comparison to verify
what it copied.
"""

from __future__ import annotations

from stead.system.compare import Drift, PackageDrift, PathDrift, compare, compare_manifests
from stead.system.manifest import PathEntry, Scope, SystemManifest, build_manifest
from stead.system.packages import list_packages
from stead.system.snapshot import Snapshot, take_snapshot

__all__ = [
    "Drift",
    "PackageDrift",
    "PathDrift",
    "PathEntry",
    "Scope",
    "Snapshot",
    "SystemManifest",
    "build_manifest",
    "compare",
    "compare_manifests",
    "list_packages",
    "take_snapshot",
]
