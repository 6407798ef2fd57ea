"""Process tuning at agent start: the allocator, the garbage collector, the open-file limit.

Keep large buffers in the agent's heap instead of mapping and zeroing them each time.

Replication moves file data in buffers of 64 KiB to a few MiB (reads, records, frames,
staging writes). glibc serves such a buffer with a fresh ``mmap`` (or trims the heap once
about 2 MiB is free at its top), so every buffer costs page faults and the kernel zeroing
its pages again: about a fifth of a passive's CPU while 1 GiB of 1 MiB files arrived.
:func:`tune_malloc` raises both thresholds at agent start (``mallopt``). The cost is memory
the agent keeps after a burst: at most ``TRIM_THRESHOLD`` free at the top of each heap.

An administrator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (glibc's
environment tunables) wins: that setting is left alone. Other C libraries: nothing is done.

:func:`tune_gc` makes Python's cyclic garbage collector run less often: every
replicated file makes a few container objects (an entry, tuples, a dict on the wire),
and with the default threshold (a young collection every 700 allocations) the collector
took about 4 % of both agents' CPU on 100,000 small files. The objects that live as long as
the agent (modules, configuration) are frozen out of its scans, and a young collection
waits for ``GC_YOUNG`` allocations: 100,000 small files then took about 4 % less time
(alternating runs in the lab). Reference counting still frees everything without cycles
at once; only cyclic garbage waits a little longer.

:func:`raise_open_files` lifts the soft ``RLIMIT_NOFILE`` to the hard limit (at most
``OPEN_FILES``), as systemd advises daemons that do not use ``select()`` (its default soft
limit is 1,024): the applier holds up to half the soft limit of small files open between
writing and naming them (see :mod:`stead.replication.applier`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import resource

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 * 1024**2  # below this, buffers come from the heap and are reused
TRIM_THRESHOLD = 32 * 1024**2  # free memory a heap keeps at its top before giving it back

_SETTINGS = (
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
)


def tune_malloc() -> list[str]:
    """Apply the thresholds this process may set; return the names of those applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no mallopt in this C library: allocator left as it is")
        return []
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = []
    for env, param, value in _SETTINGS:
        if os.environ.get(env):
            continue  # the administrator's choice
        if mallopt(param, value) == 1:
            applied.append(env.strip("_").lower())
    return applied


GC_YOUNG = 20_000  # allocations between young collections (Python's default: 700)
GC_OLDER = 20  # young collections per middle one, middle ones per full one (default: 10)


def tune_gc() -> tuple[int, int, int]:
    """Freeze what exists now out of the collector's scans and raise its thresholds."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, GC_OLDER, GC_OLDER)
    return gc.get_threshold()


OPEN_FILES = 65536


def raise_open_files() -> int:
    """Raise the soft open-file limit towards the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.info("open-file limit left at %d: %s", soft, exc)
            return soft
        return want
    return soft
