"""The full scan: the whole protected state as entries, for the initial sync and rescans.

Emits, root by root (sorted by name), every protected entry in :meth:`Filter.walk` order:
a directory's ``MKDIR`` before anything inside it, files as ``FILE`` parts (or ``DELTA``
when the manifest has a record), symlinks as ``SYMLINK``, further names of a hard-linked
inode as ``LINK``. A scan sends current state only: it cannot express what was deleted,
which is the full system check's business.

Timing: batches are produced lazily, so a consumer that appends each batch to the journal
before asking for the next keeps memory bounded; the manifest is committed each time the
consumer comes back for more, i.e. after the previous batch was taken (the manifest's
"truth" duty). Blocking: run it in a worker thread.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from stead.replication.capture.base import FileReader
from stead.replication.entries import Entry
from stead.replication.filters import Filter
from stead.replication.manifest import Manifest

BATCH_ENTRIES = 1024
BATCH_BYTES = 8 * 1024 * 1024


def scan_entries(
    roots: dict[str, Path],
    filters: dict[str, Filter],
    reader: FileReader,
    *,
    on_dir: Callable[[str, str], None] | None = None,
    under: tuple[str, str] | None = None,
) -> Iterator[Entry]:
    """Entries for every protected path; ``on_dir(root, reldir)`` runs before each listing.

    ``on_dir`` is how capture adds an inotify watch to a directory before listing it (so a
    file created meanwhile is seen either by the listing or by an event). ``under`` limits
    the scan to one ``(root, reldir)`` subtree, the directory itself included.
    """
    names = [under[0]] if under is not None else sorted(roots)
    for name in names:
        root = roots[name]
        filt = filters.get(name) or Filter()
        base = os.fspath(root)
        start = under[1] if under is not None else ""
        if start:
            abspath = os.path.join(base, start)
            try:
                st = os.lstat(abspath)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                yield from reader.entries(name, start, abspath, resend_linked=False)
                continue
        if on_dir is not None:
            on_dir(name, start)
        if start:
            yield from reader.entries(name, start, os.path.join(base, start))
        for relpath, st in filt.walk(root, under=start):
            if stat.S_ISDIR(st.st_mode) and on_dir is not None:
                on_dir(name, relpath)
            yield from reader.entries(
                name, relpath, os.path.join(base, relpath), resend_linked=False
            )


def take_batch(
    entries: Iterator[Entry], max_entries: int = BATCH_ENTRIES, max_bytes: int = BATCH_BYTES
) -> list[Entry]:
    """The next batch of ``entries``, bounded by count and payload bytes ([] at the end)."""
    batch: list[Entry] = []
    size = 0
    for entry in entries:
        batch.append(entry)
        size += entry.payload_bytes()
        if len(batch) >= max_entries or size >= max_bytes:
            break
    return batch


def batched(
    entries: Iterator[Entry],
    *,
    max_entries: int = BATCH_ENTRIES,
    max_bytes: int = BATCH_BYTES,
    after_batch: Callable[[], None] | None = None,
) -> Iterator[list[Entry]]:
    """Group entries into batches bounded by count and payload bytes."""
    while batch := take_batch(entries, max_entries, max_bytes):
        yield batch
        if after_batch is not None:
            after_batch()


def initial_scan(
    roots: dict[str, Path],
    filters: dict[str, Filter],
    manifest: Manifest | None,
    *,
    reader: FileReader | None = None,
    max_entries: int = BATCH_ENTRIES,
    max_bytes: int = BATCH_BYTES,
) -> Iterator[list[Entry]]:
    """The whole protected state of ``roots`` as batches of entries (see the module doc)."""
    reader = reader or FileReader(manifest)
    return batched(
        scan_entries(roots, filters, reader),
        max_entries=max_entries,
        max_bytes=max_bytes,
        after_batch=manifest.commit if manifest is not None else None,
    )
