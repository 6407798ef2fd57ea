"""Full system check and fast check: compare a passive with the active and repair it.

The passive lists its protected set (``answer_list``): type, size, mtime, mode, owner and,
for a full check, a BLAKE3 digest per block. The active walks its own set and compares.
Every repair is an ordinary journal entry, produced by capture from the active's current
state (capture is told what the passive really holds, so a large file that differs in a few
blocks gets a DELTA of exactly those blocks); paths only the passive has get a DELETE.

Timing duty: before listing, the check waits (bounded) until the passive has applied the
journal head, so that what it lists is not about to be changed by entries still in flight.
Entries journaled after that point are applied before the repairs, which carry the active's
latest state, so the passive converges either way.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stead.errors import ProtocolError, TimeoutExpired, UsageError
from stead.replication.entries import Entry, Op, check_relative_path
from stead.replication.filters import Filter
from stead.replication.manifest import HASH_SIZE, block_hash, read_blocks

if TYPE_CHECKING:
    from stead.replication.capture.core import EventCapture
    from stead.replication.sender import Sender

PAGE = 5000
PAGE_HASH_BYTES = 256 * 1024**2  # a full-check page hashes at most this much file data
CATCH_UP_TIMEOUT = 120.0
LINK_ID_MASK = 2**63 - 1
LISTING_TTL = 600.0
_check_ids = itertools.count(1)
_listings: dict[str, tuple[float, list[tuple[str, os.stat_result]]]] = {}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISLNK(mode):
        return "l"
    return "o"


def file_hashes(path: Path, size: int, block_size: int) -> bytes:
    """Concatenated block digests of a file, holes hashed as zeros (no read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    try:
        digests = bytearray()
        for offset, data in read_blocks(fd, size, block_size):
            digests += block_hash(
                data if data is not None else bytes(min(block_size, size - offset))
            )
        return bytes(digests)
    finally:
        os.close(fd)


def link_id(st: os.stat_result) -> int:
    """Which inode a file with further names is (equal ids: one inode), 0 for any other.

    Only compared within one listing: it tells the active which of the passive's names
    share an inode, so that a split or wrongly joined hard link is found and mended.
    """
    if st.st_nlink < 2 or not stat.S_ISREG(st.st_mode):
        return 0
    return hash((st.st_dev, st.st_ino)) & LINK_ID_MASK or 1


def _item(root: Path, relpath: str, st: os.stat_result, full: bool, block_size: int) -> list[Any]:
    kind = _kind(st.st_mode)
    extra: Any = None
    if kind == "l":
        extra = os.readlink(root / relpath)
    elif kind == "f" and full:
        try:
            extra = file_hashes(root / relpath, st.st_size, block_size)
        except OSError:
            extra = b""
    return [
        relpath,
        kind,
        st.st_size if kind == "f" else 0,
        st.st_mtime_ns,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        extra,
        link_id(st),
    ]


def _list_page(
    roots: dict[str, Path], filters: dict[str, Filter], body: dict[str, Any]
) -> dict[str, Any]:
    root_key = body.get("root")
    if not isinstance(root_key, str) or root_key not in roots:
        raise UsageError(f"not a protected root: {root_key!r}")
    listing_id = body.get("listing")
    index = body.get("index", 0)
    block_size = body.get("block_size", 65536)
    full = body.get("full", False)
    if not isinstance(index, int) or index < 0 or not isinstance(full, bool):
        raise ProtocolError("malformed list request")
    if not isinstance(block_size, int) or not 4096 <= block_size <= 16 * 1024**2:
        raise ProtocolError("block_size out of range")
    now = time.monotonic()
    for key in [k for k, (at, _) in _listings.items() if now - at > LISTING_TTL]:
        del _listings[key]
    root = roots[root_key]
    if not listing_id:
        listing_id = f"{os.getpid()}-{next(_check_ids)}"
        _listings[listing_id] = (now, list(filters[root_key].walk(root)))
    elif listing_id not in _listings:
        raise ProtocolError(f"listing {listing_id!r} expired")
    _, entries = _listings[listing_id]
    items = []
    hashed = 0
    position = index
    while position < len(entries) and position - index < PAGE and hashed < PAGE_HASH_BYTES:
        relpath, st = entries[position]
        position += 1
        if full and stat.S_ISREG(st.st_mode):
            hashed += st.st_size
        try:
            items.append(_item(root, relpath, st, full, block_size))
        except FileNotFoundError:
            continue
    done = position >= len(entries)
    if done:
        _listings.pop(listing_id, None)
    return {
        "listing": listing_id,
        "items": items,
        "total": len(entries),
        "done": done,
        "next": position,
    }


async def answer_list(
    roots: dict[str, Path], filters: dict[str, Filter], body: dict[str, Any]
) -> dict[str, Any]:
    """The passive's side: one page of its listing of a root (walked once per check)."""
    return await asyncio.to_thread(_list_page, roots, filters, body)


def _validate_item(item: Any) -> tuple[str, list[Any]]:
    """One item of a passive's listing; a ninth field (link id) is optional (older peers)."""
    if not isinstance(item, list) or len(item) not in (8, 9) or not isinstance(item[0], str):
        raise ProtocolError("malformed listing item")
    check_relative_path(item[0])
    if item[1] not in ("d", "f", "l", "o") or not all(isinstance(v, int) for v in item[2:7]):
        raise ProtocolError(f"malformed listing item for {item[0]!r}")
    if len(item) == 9 and (not isinstance(item[8], int) or not 0 <= item[8] <= LINK_ID_MASK):
        raise ProtocolError(f"malformed link id for {item[0]!r}")
    return item[0], item


async def run_check(
    *,
    sender: Sender,
    roots: dict[str, Path],
    filters: dict[str, Filter],
    capture: EventCapture[Any],
    block_size: int,
    fast: bool,
    emit: Callable[[list[Entry]], Awaitable[None]],
    head: Callable[[], int],
    progress: dict[str, Any],
) -> dict[str, Any]:
    """Compare one passive with this active and journal the repairs; return the report."""
    name = sender.peer.name
    progress.update(node=name, phase="catching up", compared=0, total=0)
    await capture.started()  # repairs go through a running capture
    if not await sender.wait_applied(head(), timeout=CATCH_UP_TIMEOUT):
        # Listing while entries are in flight would compare against a moving target.
        raise TimeoutExpired(f"{name} did not catch up within {CATCH_UP_TIMEOUT} s")
    differences: list[dict[str, str]] = []
    repair_entries = 0
    compared = 0
    for root_key, root in roots.items():
        progress["phase"] = f"listing {root_key}"
        remote: dict[str, list[Any]] = {}
        body: dict[str, Any] = {"root": root_key, "full": not fast, "block_size": block_size}
        while True:
            reply = await sender.request("list", body, timeout=600.0)
            items = reply.body.get("items")
            if not isinstance(items, list):
                raise ProtocolError("list reply without items")
            for item in items:
                path, fields = _validate_item(item)
                remote[path] = fields
            progress["total"] = reply.body.get("total", 0)
            if reply.body.get("done", True):
                break
            next_index = reply.body.get("next")
            if not isinstance(next_index, int) or next_index <= body.get("index", 0):
                raise ProtocolError("list reply without a valid next index")
            body["listing"] = reply.body.get("listing")
            body["index"] = next_index
        progress["phase"] = f"comparing {root_key}"
        local = await asyncio.to_thread(_walk, filters[root_key], root)
        progress["total"] = max(len(local), len(remote))
        resend: list[tuple[str, bytes | None]] = []
        meta: list[Entry] = []
        linked, mislinked = _link_groups(local, remote)
        regroup: dict[tuple[str, ...], None] = dict.fromkeys(mislinked)
        for relpath, st in local:
            compared += 1
            progress["compared"] = compared
            theirs = remote.pop(relpath, None)
            what = await asyncio.to_thread(_compare, root, relpath, st, theirs, fast, block_size)
            group = linked.get(relpath)
            if what is None and group in mislinked:
                what = "links"
            if what is None:
                continue
            differences.append({"root": root_key, "path": relpath, "what": what})
            if what == "meta":
                meta.append(_meta_entry(root_key, relpath, st))
            elif group is not None:
                regroup[group] = None  # the inode goes again as one file and its links
            else:
                hashes = (
                    theirs[7] if theirs is not None and what == "content" and not fast else None
                )
                resend.append((relpath, hashes if isinstance(hashes, bytes) else None))
        deletes = _deletes(root_key, remote)
        for entry in deletes:
            differences.append({"root": root_key, "path": entry.path, "what": "extra"})
        await emit(deletes + meta)
        repair_entries += len(deletes) + len(meta)
        repair_entries += await capture.reconcile(root_key, resend, list(regroup))
    progress["phase"] = "done"
    return {"compared": compared, "differences": differences, "repair_entries": repair_entries}


def _link_groups(
    local: list[tuple[str, os.stat_result]], remote: dict[str, list[Any]]
) -> tuple[dict[str, tuple[str, ...]], set[tuple[str, ...]]]:
    """The active's hard-linked names by inode, and the inodes whose names the passive
    does not hold as exactly one inode (split, or joined with another name).

    Returns ``path -> names of its inode`` for every file with further names here, and
    the set of those name groups (or single names) to send again. A passive that lists
    no link ids (an older peer) is compared by content only.
    """
    inodes: dict[tuple[int, int], list[str]] = {}
    for relpath, st in local:
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(relpath)
    linked = {name: tuple(names) for names in inodes.values() for name in names}
    theirs: dict[int, set[str]] = {}
    for relpath, item in remote.items():
        if len(item) == 9 and item[1] == "f" and item[8]:
            theirs.setdefault(item[8], set()).add(relpath)
    mislinked: set[tuple[str, ...]] = set()
    for relpath, st in local:
        fields = remote.get(relpath)
        if fields is None or len(fields) != 9 or fields[1] != "f" or not stat.S_ISREG(st.st_mode):
            continue  # missing or another type: the content comparison sends it
        ours = linked.get(relpath, (relpath,))
        same = theirs[fields[8]] if fields[8] else {relpath}
        if same != set(ours):
            mislinked.add(ours)
            linked.setdefault(relpath, ours)
    return linked, mislinked


def _walk(rules: Filter, root: Path) -> list[tuple[str, os.stat_result]]:
    """The active's side must be complete: an unreadable directory fails the check rather
    than turning the passive's copy of it into deletions."""
    if not root.is_dir() or root.is_symlink():
        raise UsageError(f"protected path {root} is missing or not a directory here")
    return list(rules.walk(root, strict=True))


def _compare(
    root: Path,
    relpath: str,
    st: os.stat_result,
    theirs: list[Any] | None,
    fast: bool,
    block_size: int,
) -> str | None:
    if theirs is None:
        return "missing"
    kind = _kind(st.st_mode)
    if theirs[1] != kind:
        return "type"
    if kind == "l":
        return None if os.readlink(root / relpath) == theirs[7] else "content"
    if kind == "f":
        if theirs[2] != st.st_size:
            return "content"
        if fast:
            if theirs[3] != st.st_mtime_ns:
                return "content"
        else:
            hashes = theirs[7]
            if not isinstance(hashes, bytes) or len(hashes) % HASH_SIZE:
                return "content"
            if hashes != file_hashes(root / relpath, st.st_size, block_size):
                return "content"
            if theirs[3] != st.st_mtime_ns:
                return "meta"
    if (theirs[4], theirs[5], theirs[6]) != (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid):
        return "meta"
    return None


def _meta_entry(root_key: str, relpath: str, st: os.stat_result) -> Entry:
    return Entry(
        op=Op.META,
        root=root_key,
        path=relpath,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
    )


def _deletes(root_key: str, remote: dict[str, list[Any]]) -> list[Entry]:
    """DELETE entries for what only the passive has; a deleted directory covers its tree."""
    entries: list[Entry] = []
    deleted_dirs: set[str] = set()
    for relpath in sorted(remote):
        parts = relpath.split("/")
        if any("/".join(parts[:i]) in deleted_dirs for i in range(1, len(parts))):
            continue
        entries.append(Entry(op=Op.DELETE, root=root_key, path=relpath))
        if remote[relpath][1] == "d":
            deleted_dirs.add(relpath)
    return entries
