"""Journal and receive queue: record encoding, head waiters, duplicates after reconnects."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stead.errors import JournalError, ProtocolError
from stead.replication.entries import Entry, Op
from stead.replication.journal import Journal, ReceiveQueue, decode_record, encode_record

ENTRIES = [
    Entry(op=Op.FILE, root="etc", path="app/conf", data=b"\x00\xffdata", offset=4, size=9),
    Entry(op=Op.DELTA, root="data", path="db/file", blocks=((0, b"a"), (8192, b"b")), size=9000),
    Entry(op=Op.MKDIR, root="data", path="d", mode=0o750, uid=0, gid=0),
    Entry(op=Op.SYMLINK, root="data", path="link", target="/elsewhere/x"),
    Entry(op=Op.RENAME, root="data", path="a", target="b"),
    Entry(op=Op.DELETE, root="data", path="caf\udce9/\udcff"),  # not UTF-8 on disk
    Entry(op=Op.META, root="data", path="x", mode=0o644, mtime_ns=1_700_000_000_123_456_789),
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.op.value)
def test_record_round_trip(entry: Entry) -> None:
    assert decode_record(encode_record(7, entry)) == (7, entry)


@given(
    epoch=st.integers(0, 2**63),
    path=st.lists(
        st.binary(min_size=1, max_size=20).filter(lambda b: b"/" not in b and b"\0" not in b),
        min_size=1,
        max_size=4,
    ),
    data=st.binary(max_size=200),
)
def test_any_file_name_survives(epoch: int, path: list[bytes], data: bytes) -> None:
    names = [p.decode("utf-8", "surrogateescape") for p in path]
    if any(name in (".", "..") for name in names):
        return
    entry = Entry(op=Op.FILE, root="r", path="/".join(names), data=data, size=len(data))
    assert decode_record(encode_record(epoch, entry)) == (epoch, entry)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # truncated array
        msgpack.packb({"o": "file"}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb([-1, {"o": "mkdir", "r": "r", "p": "p"}]),
        msgpack.packb([True, {"o": "mkdir", "r": "r", "p": "p"}]),
        msgpack.packb([1, {"o": "mkdir", "r": "r", "p": "../escape"}]),
        msgpack.packb([1, {"o": "nope", "r": "r", "p": "p"}]),
        msgpack.packb([1, {"o": "mkdir", "r": "r", "p": "p"}]) + b"\x00",  # extra data
    ],
)
def test_malformed_records_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_record(payload)


def test_journal_append_and_read(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", segment_bytes=4096) as journal:
        assert journal.append(3, ENTRIES) == (1, len(ENTRIES))
        assert journal.append(4, ENTRIES[:2]) == (8, 9)
        assert journal.append(4, []) == (10, 9)
        assert (journal.head, journal.first, journal.record_count) == (9, 1, 9)
        raw = journal.read_from(8)
        assert [seq for seq, _ in raw] == [8, 9]
        assert raw[0][1] == encode_record(4, ENTRIES[0])  # shipped as stored
        assert journal.read_entries(1, max_records=2) == [(1, 3, ENTRIES[0]), (2, 3, ENTRIES[1])]
        journal.sync()
        assert journal.synced == 9
        assert journal.total_bytes > 0
        assert journal.dropped_through == 0
        journal.truncate_after(7)
        assert journal.head == 7
    with Journal(tmp_path / "j") as journal:
        assert journal.head == 7
        assert [e for _, _, e in journal.read_entries(1)] == ENTRIES


def test_journal_refuses_negative_epoch(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal, pytest.raises(JournalError):
        journal.append(-1, ENTRIES)


def test_journal_bound_reports_dropped(tmp_path: Path) -> None:
    big = Entry(op=Op.FILE, root="r", path="f", data=b"x" * 1000, size=1000)
    with Journal(tmp_path, max_bytes=3000, segment_bytes=1100) as journal:
        journal.append(1, [big] * 5)
        assert journal.first > 1
        assert journal.dropped_through == journal.first - 1
        journal.discard_through(journal.head)
        assert journal.first == journal.head  # the segment being written stays


async def test_wait_beyond_wakes_on_append_from_a_thread(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.append(1, ENTRIES[:1])
        assert await journal.wait_beyond(0) == 1  # already there: no wait
        waiter = asyncio.create_task(journal.wait_beyond(1, timeout=30))
        await asyncio.sleep(0)  # let it register (ordering only, not timing)
        assert not waiter.done()
        span = await asyncio.to_thread(journal.append, 1, ENTRIES[:3])
        assert span == (2, 4)
        assert await waiter == 4


async def test_wait_beyond_times_out_and_cleans_up(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        with pytest.raises(TimeoutError):
            await journal.wait_beyond(0, timeout=0.01)
        assert not journal._watch._waiters


async def test_wait_beyond_wakes_across_event_loops(tmp_path: Path) -> None:
    """An append from another thread wakes waiters on this loop (call_soon_threadsafe)."""
    with Journal(tmp_path) as journal:
        waiter = asyncio.create_task(journal.wait_beyond(0, timeout=30))
        await asyncio.sleep(0)
        thread = threading.Thread(target=journal.append, args=(1, ENTRIES[:1]))
        thread.start()
        assert await waiter == 1
        thread.join(timeout=10)


async def test_close_wakes_waiters_with_an_error(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    waiter = asyncio.create_task(journal.wait_beyond(0, timeout=30))
    await asyncio.sleep(0)
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        await waiter


def _records(epoch: int, first: int, entries: list[Entry]) -> list[tuple[int, bytes]]:
    return [(first + i, encode_record(epoch, e)) for i, e in enumerate(entries)]


def test_receive_queue_skips_duplicates_and_allows_gaps(tmp_path: Path) -> None:
    with ReceiveQueue(tmp_path / "q") as queue:
        assert queue.log.fsync_policy == "always"
        assert queue.append(_records(2, 10, ENTRIES[:3])) == 3
        assert queue.persisted == 12
        assert queue.synced == 12
        # Resent after a reconnect: the overlap is skipped and counted.
        assert queue.append(_records(2, 11, ENTRIES[:4])) == 2
        assert queue.duplicates_skipped == 2
        assert queue.append([(20, encode_record(2, ENTRIES[0]))]) == 1  # a gap
        assert [seq for seq, _, _ in queue.read_entries(0)] == [10, 11, 12, 13, 14, 20]
        assert queue.read_from(14) == [
            (14, encode_record(2, ENTRIES[3])),
            (20, _records(2, 20, ENTRIES[:1])[0][1]),
        ]
    with ReceiveQueue(tmp_path / "q") as queue:
        assert queue.persisted == 20


def test_receive_queue_refuses_bad_batches_whole(tmp_path: Path) -> None:
    with ReceiveQueue(tmp_path) as queue:
        with pytest.raises(ProtocolError):
            queue.append([*_records(1, 1, ENTRIES[:2]), (3, b"\xc1garbage")])
        with pytest.raises(ProtocolError):
            queue.append([*_records(1, 5, ENTRIES[:1]), *_records(1, 5, ENTRIES[:1])])
        assert queue.persisted == 0
        assert queue.read_from(0) == []


def test_receive_queue_discard_and_reset(tmp_path: Path) -> None:
    with ReceiveQueue(tmp_path, segment_bytes=300) as queue:
        queue.append(_records(1, 1, ENTRIES * 3))
        queue.discard_through(10)
        assert 1 < queue.first <= 11
        queue.reset(5000)
        assert (queue.persisted, queue.first, queue.record_count) == (5000, 5001, 0)
        assert queue.append(_records(1, 4999, ENTRIES[:3])) == 1
    with ReceiveQueue(tmp_path) as queue:
        assert queue.persisted == 5001


# ---- write-behind: records every passive holds never reach this disk ----------------------

BLOB = Entry(op=Op.FILE, root="r", path="f", data=b"x" * 1000, size=1000)


def _all_from(journal: Journal, seq: int) -> list[int]:
    """Every seq readable from ``seq`` on, across the log and memory, as a sender reads."""
    seqs: list[int] = []
    for _ in range(100):
        records = journal.read_from(seq)
        if not records:
            return seqs
        seqs += [rec_seq for rec_seq, _ in records]
        seq = records[-1][0] + 1
    raise AssertionError("read_from did not end")


def test_write_behind_holds_new_records_in_memory_only(tmp_path: Path) -> None:
    with Journal(tmp_path, write_behind=True) as journal:
        assert journal.append(1, ENTRIES) == (1, len(ENTRIES))
        assert (journal.log.head, journal.log.total_bytes) == (0, 0)  # nothing written
        assert journal.head == len(ENTRIES)
        assert (journal.first, journal.record_count) == (1, len(ENTRIES))
        assert journal.pending_bytes == journal.total_bytes > 0
        assert [e for _, _, e in journal.read_entries(1)] == ENTRIES


def test_write_behind_skips_what_every_passive_holds_and_keeps_numbering(tmp_path: Path) -> None:
    with Journal(tmp_path, write_behind=True) as journal:
        journal.append(1, ENTRIES)  # 1..7
        assert journal.skip_through(3) == 3
        assert journal.skipped_records == 3
        assert journal.first == 4
        journal.append(2, ENTRIES[:2])  # 8..9
        journal.flush()
        assert (journal.log.first, journal.log.head, journal.pending_bytes) == (4, 9, 0)
    with Journal(tmp_path) as reopened:
        assert (reopened.first, reopened.head) == (4, 9)
        assert [e for _, _, e in reopened.read_entries(4)] == ENTRIES[3:] + ENTRIES[:2]


def test_a_clean_stop_after_skipping_everything_keeps_the_head(tmp_path: Path) -> None:
    with Journal(tmp_path, write_behind=True) as journal:
        journal.append(1, ENTRIES)
        journal.skip_through(len(ENTRIES))
        assert journal.total_bytes == 0
    with Journal(tmp_path) as reopened:
        assert reopened.head == len(ENTRIES)  # new records never reuse a number
        assert reopened.append(1, ENTRIES[:1]) == (len(ENTRIES) + 1, len(ENTRIES) + 1)


def test_a_crash_loses_what_only_memory_held(tmp_path: Path) -> None:
    """Documented: after a crash the head may be lower than a passive's position; the sender
    then resets that passive and a full check repairs it."""
    journal = Journal(tmp_path / "j", write_behind=True)
    journal.append(1, ENTRIES[:2])
    journal.flush()
    journal.append(1, ENTRIES[2:])  # held in memory only, then the process dies
    with Journal(tmp_path / "j") as reopened:
        assert reopened.head == 2
    journal.log.close()


def test_full_memory_is_written_out_oldest_first(tmp_path: Path) -> None:
    with Journal(tmp_path, write_behind=True, pending_bytes=3000) as journal:
        journal.append(1, [BLOB] * 5)
        assert journal.log.head >= 2  # the oldest went to disk
        assert journal.pending_bytes <= 3000
        assert _all_from(journal, 1) == [1, 2, 3, 4, 5]  # across disk and memory, in order
        assert journal.first == 1


def test_reading_a_skipped_seq_shows_the_gap(tmp_path: Path) -> None:
    with Journal(tmp_path, write_behind=True, tail_bytes=0) as journal:
        journal.append(1, ENTRIES[:5])
        journal.skip_through(3)
        assert [seq for seq, _ in journal.read_from(2)] == [4, 5]  # not 2: never silent


def test_write_behind_truncate_drops_memory_first(tmp_path: Path) -> None:
    with Journal(tmp_path, write_behind=True) as journal:
        journal.append(1, ENTRIES[:2])
        journal.flush()
        journal.append(1, ENTRIES[2:5])  # 3..5 in memory
        journal.truncate_after(3)
        assert journal.head == 3
        assert _all_from(journal, 1) == [1, 2, 3]
        journal.truncate_after(1)
        assert (journal.head, _all_from(journal, 1)) == (1, [1])
        assert journal.append(1, ENTRIES[:1]) == (2, 2)


def test_tail_serves_recent_records_without_the_log(tmp_path: Path) -> None:
    with Journal(tmp_path, tail_bytes=10_000) as journal:
        journal.append(1, [BLOB] * 20)
        held = journal._tail.read(20, 1 << 20, 100)
        assert held is not None and held[-1][0] == 20
        assert journal._tail.read(1, 1 << 20, 100) is None  # evicted: the log serves it
        assert _all_from(journal, 1) == list(range(1, 21))
        journal.restart_at(100)
        assert journal._tail.read(20, 1 << 20, 100) is None


def test_records_encoded_in_many_threads_at_once_decode_to_their_entries() -> None:
    """Each thread packs with a packer of its own (reused between calls)."""

    def work(n: int) -> bool:
        for i in range(200):
            entry = Entry(Op.FILE, "/srv", f"t{n}/f{i}", data=bytes([n]) * (i + 1), size=i + 1)
            if decode_record(encode_record(n, entry)) != (n, entry):
                return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(16)))
