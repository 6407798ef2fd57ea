"""Quarantine: what a returning former active wrote after the fork, kept before repair.

When a node that was the active of an epoch comes back after another node took over, the
repairing check would replace the files it changed meanwhile. Before the applier replaces,
deletes or renames over a path in that state, the path's current content is copied to
``<state_dir>/quarantine/<generation>/<root>/<path>`` and listed in ``index.jsonl`` there.
Nothing is silently lost: the operator reviews it with ``stead quarantine list``.

The copy reads through the applier's directory descriptors (no symlink is followed) and
is idempotent: a path already kept in this generation is not copied again.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

INDEX = "index.jsonl"
COPY_CHUNK = 1024 * 1024


def keep(
    base: Path, generation: str, root: str, relpath: str, parent_fd: int, name: str, why: str
) -> bool:
    """Copy ``name`` (in ``parent_fd``) into the quarantine; False if it does not exist."""
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return False
    target = base / generation / root.strip("/").replace("/", "_") / relpath
    if target.exists() or target.is_symlink():
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=parent_fd), target)
    elif stat.S_ISREG(st.st_mode):
        _copy_file(parent_fd, name, target)
    elif stat.S_ISDIR(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            _copy_tree(fd, target)
        finally:
            os.close(fd)
    else:
        return False
    with (base / generation / INDEX).open("a") as index:
        index.write(
            json.dumps(
                {
                    "root": root,
                    "path": relpath,
                    "why": why,
                    "size": st.st_size,
                    "mtime": st.st_mtime,
                    "kept_at": time.time(),
                }
            )
            + "\n"
        )
        index.flush()
        os.fsync(index.fileno())
    return True


def _copy_file(parent_fd: int, name: str, target: Path) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        tmp = target.with_name(target.name + ".part")
        with tmp.open("wb") as out:
            while chunk := os.read(src, COPY_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        st = os.fstat(src)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.replace(tmp, target)
    finally:
        os.close(src)


def _copy_tree(dir_fd: int, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(dir_fd):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                _copy_tree(fd, target / entry.name)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(dir_fd, entry.name, target / entry.name)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(entry.name, dir_fd=dir_fd), target / entry.name)


def listing(base: Path) -> list[dict[str, Any]]:
    """Every generation with the paths kept in it, oldest first."""
    result: list[dict[str, Any]] = []
    if not base.is_dir():
        return result
    for generation in sorted(base.iterdir(), key=lambda p: p.stat().st_mtime):
        index = generation / INDEX
        items = []
        if index.exists():
            for line in index.read_text().splitlines():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        result.append({"generation": generation.name, "path": str(generation), "files": items})
    return result
