"""Configuration of what lies outside the protected set: system trees, packages, patching.

``[system]`` names the system trees (``/etc``, ``/opt``, ``/usr/local`` by default) that
``stead drift`` compares between the active and each passive and that a reclone copies, the
paths in them that stay each node's own (``preserve``), and how installed packages are
listed. ``[patch]`` says how ``stead patch`` reaches a passive through its management
identity.

Patterns are absolute globs with the syntax of the protected-path filters (``*``, ``?``,
``**``; a pattern without ``/`` matches a last component at any depth).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stead.errors import ConfigError
from stead.replication.filters import Filter

DEFAULT_TREES = ["/etc", "/opt", "/usr/local"]
DEFAULT_EXCLUDE = [
    "/etc/mtab",
    "/etc/ld.so.cache",
    "/etc/adjtime",
    "/etc/resolv.conf",
    "/etc/.pwd.lock",
    "*.swp",
    "*~",
]
DEFAULT_PRESERVE = [
    "/etc/hostname",
    "/etc/hosts",
    "/etc/machine-id",
    "/etc/ssh/ssh_host_*",
    "/etc/network/**",
    "/etc/netplan/**",
    "/etc/systemd/network/**",
    "/etc/NetworkManager/system-connections/**",
    "/etc/stead/**",
]
PLACEHOLDERS = ("{host}", "{node}", "{fqdn}", "{hostname}", "{address}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute_patterns(values: list[str]) -> list[str]:
    for value in values:
        if not value or "\0" in value:
            raise ValueError(f"pattern {value!r} is empty or holds NUL")
        if "/" in value and not value.startswith("/"):
            raise ValueError(f"pattern {value!r} must be absolute (start with /) or a bare name")
        try:
            Filter(include=[value.lstrip("/")])
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    return values


class SystemSection(_Strict):
    """System trees outside the protected set, compared by drift and copied by reclone."""

    trees: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TREES),
        description="absolute directories compared by `stead drift` and copied by reclone",
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="paths in the trees that are neither compared nor copied",
    )
    preserve: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PRESERVE),
        description="paths that stay each node's own: drift ignores them, reclone keeps them",
    )
    packages: Literal["auto", "dpkg", "rpm", "none"] = Field(
        default="auto", description="how installed packages are listed (auto: dpkg, then rpm)"
    )

    @field_validator("trees")
    @classmethod
    def _trees(cls, values: list[str]) -> list[str]:
        pures = []
        for value in values:
            pure = PurePosixPath(value)
            if not pure.is_absolute() or ".." in pure.parts or str(pure) == "/":
                raise ValueError(f"tree {value!r} must be an absolute path below / without '..'")
            pures.append(pure)
        for i, a in enumerate(pures):
            for b in pures[i + 1 :]:
                if a == b or a in b.parents or b in a.parents:
                    raise ValueError(f"system trees {a} and {b} overlap")
        return [str(p) for p in pures]

    @field_validator("exclude", "preserve")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        return _absolute_patterns(values)

    def compared(self) -> PathSet:
        """The paths drift compares and reclone copies: everything not excluded."""
        return PathSet(self.exclude, negate=True)

    def preserved(self) -> PathSet:
        """The paths that are each node's own."""
        return PathSet(self.preserve)


class PathSet:
    """Absolute paths matched against globs (a directory's pattern covers what is under it)."""

    def __init__(self, patterns: list[str], *, negate: bool = False) -> None:
        self.patterns = list(patterns)
        self._negate = negate
        self._filter = Filter(include=[p.lstrip("/") for p in patterns]) if patterns else None

    @property
    def pattern(self) -> str | None:
        """A regular expression over a path without its leading ``/`` that every path the
        globs match fully matches (before ``negate``); None without globs. For a quick
        "surely not" in a walk; membership is still decided by ``in``."""
        return self._filter.include_pattern if self._filter is not None else None

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        hit = self._filter is not None and self._filter.protected(path.lstrip("/"), False)
        return hit != self._negate


class PatchSection(_Strict):
    """How `stead patch` runs a command on a node through its management identity."""

    connect: list[str] = Field(
        default_factory=lambda: [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "root@{host}",
        ],
        min_length=1,
        description=(
            "argv that runs a command on a node; the command is appended. Placeholders: "
            "{host} (management FQDN, else host name, else address), {node}, {fqdn}, "
            "{hostname}, {address}"
        ),
    )
    command: str = Field(default="", description="default patch command (shell text)")
    timeout: float = Field(default=3600.0, gt=0, le=86400, description="per node, seconds")
    gate_timeout: float = Field(
        default=600.0, gt=0, le=86400, description="wait for sync and health, seconds"
    )
    switch_back: bool = Field(
        default=False, description="switch back to the original active after patching it"
    )

    @field_validator("connect")
    @classmethod
    def _connect(cls, values: list[str]) -> list[str]:
        if not any(p in value for value in values for p in PLACEHOLDERS):
            raise ValueError(
                "patch.connect must name the node, through one of " + ", ".join(PLACEHOLDERS)
            )
        return values
