"""kill -9 a process that appends to a segment log, again and again, then check what survived.

The child appends batches of records whose contents follow from their seqs, calls ``sync``
now and then, and prints the head after each sync. The parent kills it with SIGKILL after a
random number of reported syncs (so at a random point of an append, a roll or an fsync),
sometimes adds a torn or garbage tail as a power cut would, and reopens the log: every record
reported synced must be there, in order, and nothing returned may be corrupt. The next child
continues the same log, so recovery is exercised on a log that was itself recovered.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stead.replication.segment_format import encode
from stead.replication.segments import SegmentLog

CHILD = r"""
import random, sys
from pathlib import Path
from stead.replication.segments import SegmentLog

def payload(seq):
    size = (seq * 7919) % 3000
    return (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]

rng = random.Random(int(sys.argv[2]))
with SegmentLog(Path(sys.argv[1]), segment_bytes=64 * 1024, fsync="batch") as log:
    print(log.head, flush=True)
    for _ in range(1_000_000):  # bounded; the parent kills us long before
        first = log.head + 1
        log.append([(s, payload(s)) for s in range(first, first + rng.randint(1, 40))])
        if rng.random() < 0.3:
            log.sync()
            print(log.head, flush=True)
"""

SEGMENT_BYTES = 64 * 1024


def payload(seq: int) -> bytes:
    size = (seq * 7919) % 3000
    return (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]


def run_child_and_kill(directory: Path, rng: random.Random) -> int:
    """Start a child, let it report some syncs, SIGKILL it; return the last head it reported."""
    syncs_before_kill = rng.randint(1, 60)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(rng.getrandbits(32))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    reported = -1
    try:
        for _ in range(syncs_before_kill + 1):
            line = child.stdout.readline()
            if not line:
                break
            reported = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert reported >= 0, "child reported nothing"
    return reported


def damage_tail(directory: Path, rng: random.Random) -> None:
    """What a power cut may leave past the synced data: half records, zeros, noise."""
    last = sorted(directory.glob("*.seg"))[-1]
    choice = rng.randrange(4)
    with last.open("ab") as f:
        if choice == 1:
            f.write(encode(2**40, b"y" * 500) + b"y" * rng.randint(0, 499))
        elif choice == 2:
            f.write(b"\0" * rng.randint(1, 5000))
        elif choice == 3:
            f.write(rng.randbytes(rng.randint(1, 5000)))


@pytest.mark.slow
def test_sigkill_during_appends_loses_nothing_synced(tmp_path: Path) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    directory = tmp_path / "log"
    synced_head = 0
    for _round in range(8):
        reported = run_child_and_kill(directory, rng)
        assert reported >= synced_head, "a reopened child lost synced records"
        synced_head = reported
        if rng.random() < 0.5:
            damage_tail(directory, rng)
        with SegmentLog(directory, segment_bytes=SEGMENT_BYTES) as log:
            assert log.head >= synced_head
            assert log.first == 1
            expected = 1
            for _ in range(log.head + 1):  # bounded: each pass returns at least one record
                got = log.read_from(expected, max_bytes=1 << 20)
                if not got:
                    break
                for seq, data in got:
                    assert seq == expected, "records out of order or missing"
                    assert data == payload(seq), f"record {seq} differs"
                    expected += 1
            assert expected - 1 == log.head
