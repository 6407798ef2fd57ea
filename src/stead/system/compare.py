"""How two nodes differ outside the protected set: a pure comparison, in a stable order.

:func:`compare` takes the active's and a passive's package lists and manifests and returns a
:class:`Drift`: packages only on either side or in another version; paths only on either
side, with other content (file bytes, symlink target, device number), other metadata (mode,
owner, group) or of another type. A path that either node could not read (or that lies in a
directory it could not list) is listed as unreadable: not compared, and not counted as drift.
Every list is sorted by path or name, so equal inputs give equal output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stead.system.manifest import PathEntry, SystemManifest


@dataclass(frozen=True)
class PackageDrift:
    """Packages by name: only on the active, only on the passive, or in another version."""

    only_active: dict[str, str] = field(default_factory=dict)
    only_passive: dict[str, str] = field(default_factory=dict)
    version_differs: dict[str, tuple[str, str]] = field(default_factory=dict)  # (active, passive)

    def count(self) -> int:
        return len(self.only_active) + len(self.only_passive) + len(self.version_differs)

    def to_json(self) -> dict[str, Any]:
        return {
            "only_active": dict(self.only_active),
            "only_passive": dict(self.only_passive),
            "version_differs": {k: list(v) for k, v in self.version_differs.items()},
        }


@dataclass(frozen=True)
class PathDrift:
    """Paths of the system trees that differ, each list sorted by path."""

    only_active: list[str] = field(default_factory=list)
    only_passive: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    # {"path": ..., "differs": {"mode": ["0644", "0600"], "uid": [0, 1000]}}: active first
    metadata: list[dict[str, Any]] = field(default_factory=list)
    type: list[dict[str, str]] = field(default_factory=list)  # path, active, passive
    unreadable: list[dict[str, str]] = field(default_factory=list)  # path, active, passive
    compared: int = 0

    def count(self) -> int:
        return (
            len(self.only_active)
            + len(self.only_passive)
            + len(self.content)
            + len(self.metadata)
            + len(self.type)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "only_active": list(self.only_active),
            "only_passive": list(self.only_passive),
            "content": list(self.content),
            "metadata": list(self.metadata),
            "type": list(self.type),
            "unreadable": list(self.unreadable),
            "compared": self.compared,
        }


@dataclass(frozen=True)
class Drift:
    """What differs; ``None`` for a part that was not compared."""

    packages: PackageDrift | None
    paths: PathDrift | None

    def count(self) -> int:
        return (self.packages.count() if self.packages else 0) + (
            self.paths.count() if self.paths else 0
        )

    @property
    def in_step(self) -> bool:
        return self.count() == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "in_step": self.in_step,
            "differences": self.count(),
            "packages": self.packages.to_json() if self.packages else None,
            "paths": self.paths.to_json() if self.paths else None,
        }


def compare_packages(active: dict[str, str], passive: dict[str, str]) -> PackageDrift:
    return PackageDrift(
        only_active={n: active[n] for n in sorted(active.keys() - passive.keys())},
        only_passive={n: passive[n] for n in sorted(passive.keys() - active.keys())},
        version_differs={
            n: (active[n], passive[n])
            for n in sorted(active.keys() & passive.keys())
            if active[n] != passive[n]
        },
    )


def _metadata(a: PathEntry, p: PathEntry) -> dict[str, list[Any]]:
    differs: dict[str, list[Any]] = {}
    if a.mode != p.mode:
        differs["mode"] = [f"{a.mode:04o}", f"{p.mode:04o}"]
    if a.uid != p.uid:
        differs["uid"] = [a.uid, p.uid]
    if a.gid != p.gid:
        differs["gid"] = [a.gid, p.gid]
    return differs


def _same_content(a: PathEntry, p: PathEntry) -> bool:
    if a.kind == "file":
        return a.digest == p.digest and a.size == p.size
    if a.kind == "symlink":
        return a.target == p.target
    if a.kind in ("char", "block"):
        return a.rdev == p.rdev
    return True


def _unlisted_dirs(manifest: SystemManifest) -> list[str]:
    return [e.path for e in manifest.entries.values() if e.kind == "dir" and e.error]


def compare_manifests(active: SystemManifest, passive: SystemManifest) -> PathDrift:
    """Every path of either manifest, compared (see the module's docstring)."""
    blind = sorted({*_unlisted_dirs(active), *_unlisted_dirs(passive)})
    prefixes = tuple(d.rstrip("/") + "/" for d in blind)
    only_active: list[str] = []
    only_passive: list[str] = []
    content: list[str] = []
    metadata: list[dict[str, Any]] = []
    kinds: list[dict[str, str]] = []
    unreadable: list[dict[str, str]] = []
    compared = 0
    for path in sorted(active.entries.keys() | passive.entries.keys()):
        if prefixes and path.startswith(prefixes):
            continue  # in a directory one side could not list: that directory is reported
        a, p = active.entries.get(path), passive.entries.get(path)
        if p is None:
            only_active.append(path)
            continue
        if a is None:
            only_passive.append(path)
            continue
        compared += 1
        if a.kind != p.kind:
            kinds.append({"path": path, "active": a.kind, "passive": p.kind})
            continue
        differs = _metadata(a, p)
        if differs:
            metadata.append({"path": path, "differs": differs})
        if a.error or p.error:
            unreadable.append({"path": path, "active": a.error, "passive": p.error})
        elif not _same_content(a, p):
            content.append(path)
    return PathDrift(
        only_active, only_passive, content, metadata, kinds, unreadable, compared=compared
    )


def compare(
    active_packages: dict[str, str] | None,
    passive_packages: dict[str, str] | None,
    active_manifest: SystemManifest | None,
    passive_manifest: SystemManifest | None,
) -> Drift:
    """The drift of a passive from the active; a part missing on either side is skipped."""
    packages = (
        compare_packages(active_packages, passive_packages)
        if active_packages is not None and passive_packages is not None
        else None
    )
    paths = (
        compare_manifests(active_manifest, passive_manifest)
        if active_manifest is not None and passive_manifest is not None
        else None
    )
    return Drift(packages, paths)
