"""The disks of lab nodes: sparse ext4 images, and filling one up (a disk-full fault)."""

from __future__ import annotations

import re
from pathlib import Path

from stead.errors import LabError
from stead.lab import netns

FILL_FILE = ".stead-lab-fill"
_SIZE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``2G``, ``512M``, ``1048576`` (powers of 1024) to bytes."""
    match = _SIZE.match(text.strip())
    if not match:
        raise LabError(f"not a size: {text!r} (examples: 2G, 512M)")
    unit: int = 1024 ** "BKMGT".index((match[2] or "B").upper())
    return int(match[1]) * unit


def make_image(image: Path, size: int, label: str) -> None:
    """A sparse ext4 image with many inodes (tests make many small files)."""
    with open(image, "wb") as out:
        out.truncate(size)
    lazy = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
    label = f"stead-{label}"[:16]
    netns.run(
        ["mkfs.ext4", "-q", "-F", "-i", "4096", "-m", "0", "-L", label, "-E", lazy, str(image)]
    )


# Runs inside a node: fill the file system at argv[1] with the file argv[2] until it is full.
FILL_SCRIPT = """
import errno, os, sys
root, name = sys.argv[1], sys.argv[2]
fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
st = os.statvfs(root)
try:
    os.posix_fallocate(fd, os.fstat(fd).st_size, max(st.f_bavail * st.f_frsize, 1))
except OSError as exc:
    if exc.errno != errno.ENOSPC:
        raise
size = 1 << 20
while size:
    try:
        os.write(fd, bytes(size))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        size //= 2
os.fsync(fd)
"""
