"""The passive's staging files: a reclone's answers written and hashed as they arrive.

:class:`Staging` is one writer thread's share of a copy (see :mod:`stead.reclone.transfer`):
it writes each answer's chunks into the staging names the plan gave, hashes every file as
it is written and checks it against the digest the manifest or the active gave.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import blake3

from stead.errors import ProtocolError
from stead.fsutil import WRITEBACK_FROM, DirectWriter, start_writeback
from stead.reclone.plan import Fetch
from stead.reclone.swap import set_meta, set_meta_fd


class _Open:
    """A staging file being written: its descriptor and the hash of what was written."""

    __slots__ = ("fd", "hasher", "intact", "offset")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hasher = blake3.blake3()
        self.offset = 0  # the next offset expected
        self.intact = True  # every chunk so far came whole and in order


class Staging:
    """Writes answers into staging files and hashes each file as its chunks are written.

    Chunks of one file must come in offset order (one writer, batches in request order); the
    hash fed with them is then exactly the hash of the staged file. It must equal the
    manifest's digest or, where the manifest had none, the digest the active sent with the
    file's last range. A short or out-of-order chunk, or no digest to check against (the
    file changed on the active), makes the file fail its check, as a re-read would. As each
    file completes, its write-back is started (``sync_file_range``), so that the swap's
    ``syncfs`` finds little left to flush.
    """

    def __init__(self) -> None:
        self.files: dict[str, _Open] = {}
        self.writer = DirectWriter()  # large chunks bypass the page cache
        self.verified: dict[str, str] = {}  # path: the digest its staged copy matched

    def write_batch(
        self,
        batch: list[tuple[Fetch, int, int]],
        data: list[Any],
        digests: list[Any] | None = None,
    ) -> list[tuple[Fetch, bool]]:
        """Write one answer; returns the files it completed and whether each matched."""
        done = []
        if digests is None:
            digests = [None] * len(batch)
        for (f, offset, length), chunk, sent in zip(batch, data, digests, strict=True):
            if not isinstance(chunk, bytes | memoryview) or len(chunk) > length:
                raise ProtocolError(f"read: bad data for {f.path}")
            state = self.files.get(f.staged)
            if state is None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                state = self.files[f.staged] = _Open(os.open(f.staged, flags, 0o600))
            if chunk:
                self.writer.pwrite(state.fd, chunk, offset)
            if offset != state.offset or len(chunk) != length:
                state.intact = False
            elif chunk:
                state.hasher.update(chunk)
            state.offset = offset + len(chunk)
            if offset + length >= f.item.size:
                del self.files[f.staged]
                try:
                    if state.offset != f.item.size:  # written whole: already its size
                        os.ftruncate(state.fd, f.item.size)
                    expected = f.item.digest or (sent if isinstance(sent, str) else "")
                    ok = state.intact and bool(expected)
                    ok = ok and state.hasher.hexdigest() == expected
                    if ok:
                        set_meta_fd(state.fd, f.item.meta)  # no path lookups: 50,000 files
                        if f.item.size >= WRITEBACK_FROM:
                            start_writeback(state.fd)
                finally:
                    os.close(state.fd)
                if ok:
                    self.verified[f.path] = expected
                done.append((f, ok))
        return done

    def close(self) -> None:
        self.writer.close()
        for state in self.files.values():
            with contextlib.suppress(OSError):
                os.close(state.fd)
        self.files.clear()


def make_symlink(f: Fetch) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f.staged)
    os.symlink(f.item.target, f.staged)
    set_meta(f.staged, f.item.meta, symlink=True)


def make_symlinks(links: list[Fetch]) -> None:
    for f in links:
        make_symlink(f)
