"""One node's packages and system manifest together, and how a peer fetches them in pages.

A :class:`Snapshot` is what ``stead drift`` compares: the node's installed packages and
its :class:`~stead.system.manifest.SystemManifest`, with the :class:`Scope` it was walked
by. Its wire form is one msgpack map compressed with zstd.

Peers ask for it over a heartbeat link (request kind :data:`SNAPSHOT_REQUEST`), whose
frames are small (1 MiB, see :mod:`stead.agent.membership`) while a manifest of ``/usr``
may take many megabytes. So the node that answers (:class:`SnapshotPages`) builds the
snapshot once, keeps its compressed form under a token and hands it out in pages of
:data:`PAGE_BYTES`; the asking side (:func:`fetch_snapshot`) reads the pages in turn, checks
their length and BLAKE3 digest, and decodes with a bound on the decompressed size.

Timing duties: building runs in a worker thread, one build at a time per node; a kept
snapshot is dropped once its last page is served, after :data:`KEEP_SECONDS`, or when more
than :data:`KEEP_COUNT` are kept, so an asker that goes away costs bounded memory.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import zstandard

from stead.channel.framing import FLAG_ZSTD, decode_payload, pack
from stead.errors import ProtocolError, SteadError, UsageError
from stead.system.hashcache import HashCache
from stead.system.manifest import Scope, SystemManifest, build_manifest
from stead.system.packages import list_packages

SNAPSHOT_REQUEST = "system-manifest"
PAGE_BYTES = 256 * 1024  # well inside a heartbeat link's 1 MiB frames
MAX_SNAPSHOT_BYTES = 512 * 1024**2  # decompressed; compressed it is smaller still
KEEP_SECONDS = 300.0
KEEP_COUNT = 4
BUILD_TIMEOUT = 600.0  # seconds a node may take to walk its trees and list its packages
PAGE_TIMEOUT = 30.0

Ask = Callable[[dict[str, Any], float], Awaitable[dict[str, Any]]]


@dataclass
class Snapshot:
    """A node's packages and manifest; ``None`` for a part that was not asked for."""

    node: str
    scope: dict[str, list[str]]
    manager: str  # the package manager used: dpkg, rpm, none ("" when packages not asked)
    packages: dict[str, str] | None
    manifest: SystemManifest | None
    seconds: float = 0.0  # how long taking it took

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "scope": self.scope,
            "manager": self.manager,
            "packages": self.packages,
            "manifest": self.manifest.to_wire() if self.manifest is not None else None,
            "seconds": self.seconds,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Snapshot:
        node, scope, manager = wire.get("node"), wire.get("scope"), wire.get("manager")
        packages, manifest = wire.get("packages"), wire.get("manifest")
        seconds = wire.get("seconds", 0.0)
        if (
            not isinstance(node, str)
            or not isinstance(manager, str)
            or not isinstance(scope, dict)
            or not isinstance(seconds, int | float)
        ):
            raise ProtocolError("snapshot without node, scope or manager")
        if packages is not None and (
            not isinstance(packages, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in packages.items())
        ):
            raise ProtocolError("snapshot packages are not a map of names to versions")
        return cls(
            node=node,
            scope=scope,
            manager=manager,
            packages=packages,
            manifest=SystemManifest.from_wire(manifest) if manifest is not None else None,
            seconds=float(seconds),
        )


def take_snapshot(
    node: str,
    scope: Scope,
    packages_mode: str,
    *,
    trees: bool = True,
    packages: bool = True,
    cache: Path | None = None,
) -> Snapshot:
    """This node's snapshot (blocking: it walks the trees and runs the package manager).
    With ``cache`` (a :class:`HashCache` file), unchanged files are not read again."""
    started = time.monotonic()
    manager, installed = list_packages(packages_mode) if packages else ("", None)
    hashes = HashCache(cache) if cache is not None else None
    manifest = build_manifest(scope, cache=hashes) if trees else None
    return Snapshot(
        node=node,
        scope=scope.describe(),
        manager=manager,
        packages=installed,
        manifest=manifest,
        seconds=round(time.monotonic() - started, 3),
    )


def encode_snapshot(snapshot: Snapshot, max_size: int = MAX_SNAPSHOT_BYTES) -> bytes:
    """The wire form; refuses a snapshot that the asking side would refuse to decode."""
    raw = pack(snapshot.to_wire())
    if len(raw) > max_size:
        raise UsageError(
            f"the system snapshot of {snapshot.node} takes {len(raw)} bytes, more than "
            f"{max_size}: exclude paths in [system] exclude"
        )
    return zstandard.ZstdCompressor(level=3).compress(raw)


def decode_snapshot(data: bytes, max_size: int = MAX_SNAPSHOT_BYTES) -> Snapshot:
    """The snapshot ``data`` holds, refusing one that decompresses past ``max_size``."""
    try:
        wire = decode_payload(data, FLAG_ZSTD, max_size)
    except SteadError as exc:
        raise ProtocolError(f"snapshot: {exc}") from None
    return Snapshot.from_wire(wire)


class SnapshotPages:
    """This node's side of :data:`SNAPSHOT_REQUEST`: build a snapshot, serve it in pages.

    A request without a token builds a snapshot (body: ``trees``, ``packages``, both true
    by default) and answers with its first page, the page count, total length and digest;
    a request with ``token`` and ``page`` answers with that page.
    """

    def __init__(
        self,
        node: str,
        scope: Scope,
        packages_mode: str,
        *,
        page_bytes: int = PAGE_BYTES,
        clock: Callable[[], float] = time.monotonic,
        cache: Path | None = None,
    ) -> None:
        self.cache = cache
        self.node = node
        self.scope = scope
        self.packages_mode = packages_mode
        self.page_bytes = page_bytes
        self.clock = clock
        self._kept: dict[str, tuple[float, bytes]] = {}
        self._building = asyncio.Lock()

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        token = body.get("token")
        if token:
            return self._page(token, body.get("page"))
        trees, packages = body.get("trees", True), body.get("packages", True)
        if not isinstance(trees, bool) or not isinstance(packages, bool):
            raise UsageError("trees and packages must be true or false")
        async with self._building:
            try:
                snapshot = await asyncio.to_thread(self.take, trees, packages)
                blob = await asyncio.to_thread(encode_snapshot, snapshot)
            except (OSError, ValueError) as exc:  # an error here must not break the link
                raise SteadError(f"taking the system snapshot failed: {exc}") from None
        token = secrets.token_hex(16)
        self._keep(token, blob)
        first = self._page(token, 0)
        return {
            **first,
            "pages": max(1, math.ceil(len(blob) / self.page_bytes)),
            "bytes": len(blob),
            "digest": blake3.blake3(blob).digest(),
        }

    def take(self, trees: bool, packages: bool) -> Snapshot:
        """This node's snapshot (blocking: runs in a worker thread)."""
        return take_snapshot(
            self.node,
            self.scope,
            self.packages_mode,
            trees=trees,
            packages=packages,
            cache=self.cache,
        )

    def _keep(self, token: str, blob: bytes) -> None:
        now = self.clock()
        for old, (kept_at, _blob) in list(self._kept.items()):
            if now - kept_at > KEEP_SECONDS:
                del self._kept[old]
        while len(self._kept) >= KEEP_COUNT:
            del self._kept[next(iter(self._kept))]  # the oldest first
        self._kept[token] = (now, blob)

    def _page(self, token: object, page: object) -> dict[str, Any]:
        if not isinstance(token, str) or token not in self._kept:
            raise UsageError("no such system snapshot (expired or fully read); ask again")
        kept_at, blob = self._kept[token]
        pages = max(1, math.ceil(len(blob) / self.page_bytes))
        if not isinstance(page, int) or isinstance(page, bool) or not 0 <= page < pages:
            raise UsageError(f"page must be a whole number below {pages}")
        if page == pages - 1 or self.clock() - kept_at > KEEP_SECONDS:
            del self._kept[token]
        start = page * self.page_bytes
        return {"token": token, "page": page, "data": blob[start : start + self.page_bytes]}


async def fetch_snapshot(
    ask: Ask,
    *,
    trees: bool = True,
    packages: bool = True,
    build_timeout: float = BUILD_TIMEOUT,
    page_timeout: float = PAGE_TIMEOUT,
    max_size: int = MAX_SNAPSHOT_BYTES,
) -> Snapshot:
    """A peer's snapshot, page by page through ``ask(body, timeout)`` (one request each)."""
    first = await ask({"trees": trees, "packages": packages}, build_timeout)
    token, pages = first.get("token"), first.get("pages")
    total, digest = first.get("bytes"), first.get("digest")
    if (
        not isinstance(token, str)
        or not isinstance(pages, int)
        or not isinstance(total, int)
        or not isinstance(digest, bytes)
        or not 1 <= pages <= total + 1
    ):
        raise ProtocolError("system snapshot: malformed first page")
    if total > max_size:
        raise ProtocolError(f"system snapshot of {total} bytes exceeds {max_size}")
    parts = [_data(first, 0)]
    received = len(parts[0])
    for page in range(1, pages):
        parts.append(_data(await ask({"token": token, "page": page}, page_timeout), page))
        received += len(parts[-1])
        if received > total:
            raise ProtocolError("system snapshot: more bytes than announced")
    blob = b"".join(parts)
    if len(blob) != total or blake3.blake3(blob).digest() != digest:
        raise ProtocolError("system snapshot: pages do not add up to the announced digest")
    return await asyncio.to_thread(decode_snapshot, blob, max_size)


def _data(reply: dict[str, Any], page: int) -> bytes:
    data = reply.get("data")
    if reply.get("page") != page or not isinstance(data, bytes):
        raise ProtocolError(f"system snapshot: page {page} missing or malformed")
    return data
