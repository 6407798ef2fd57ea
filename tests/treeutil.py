"""Compare file trees in tests: one record per relative path, comparable with ``==``.

``snapshot(root)`` walks ``root`` without following symlinks and returns, per relative path
(text as from :func:`os.fsdecode`, so non-UTF-8 names survive):

* ``("dir", mode)``
* ``("file", mode, size, sha256 hex, mtime_ns)``
* ``("symlink", target)``
* ``("other", mode)`` for anything else (fifo, socket, device)

Names listed in ``ignore`` are skipped at the top level only (``.stead`` is Stead's own).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

TreeRecord = tuple[object, ...]


def snapshot(root: Path, ignore: tuple[str, ...] = (".stead",)) -> dict[str, TreeRecord]:
    tree: dict[str, TreeRecord] = {}
    pending = [""]
    for _ in range(1_000_000):  # bounded walk
        if not pending:
            return tree
        rel = pending.pop()
        base = os.path.join(root, rel) if rel else os.fspath(root)
        for name in sorted(os.listdir(base)):
            if not rel and name in ignore:
                continue
            child = f"{rel}/{name}" if rel else name
            full = os.path.join(base, name)
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                tree[child] = ("dir", mode)
                pending.append(child)
            elif stat.S_ISLNK(st.st_mode):
                tree[child] = ("symlink", os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                tree[child] = ("file", mode, st.st_size, _sha256(full), st.st_mtime_ns)
            else:
                tree[child] = ("other", mode)
    raise RuntimeError(f"tree under {root} is too large to snapshot")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
