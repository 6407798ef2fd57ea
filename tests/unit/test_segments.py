"""SegmentLog: round trips, recovery from torn and corrupt files, bounds, and a model check."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stead.errors import CorruptRecord, JournalError
from stead.replication import segments
from stead.replication.segment_format import HEADER_BYTES, encode, segment_name
from stead.replication.segments import SegmentLog


def payload(seq: int, size: int | None = None) -> bytes:
    size = (seq * 37) % 300 if size is None else size
    return (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]


def records(first: int, last: int, size: int | None = None) -> list[tuple[int, bytes]]:
    return [(seq, payload(seq, size)) for seq in range(first, last + 1)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def read_all(log: SegmentLog, seq: int = 0) -> list[tuple[int, bytes]]:
    return log.read_from(seq, max_bytes=1 << 40, max_records=1 << 30)


def test_round_trip_and_properties(tmp_path: Path) -> None:
    with SegmentLog(tmp_path / "log") as log:
        assert (log.head, log.first, log.total_bytes, log.record_count) == (0, 1, 0, 0)
        assert log.read_from(1) == []
        log.append(records(1, 100))
        assert log.append_payloads([b"x", b"y"]) == (101, 102)
        assert log.append_payloads([]) == (103, 102)
        assert (log.head, log.first, log.record_count) == (102, 1, 102)
        expected = [*records(1, 100), (101, b"x"), (102, b"y")]
        assert read_all(log) == expected
        assert read_all(log, 50) == expected[49:]
        assert log.read_from(103) == []
        assert log.total_bytes == sum(HEADER_BYTES + len(p) for _, p in expected)
    assert segment_files(tmp_path / "log") == [tmp_path / "log" / segment_name(1)]
    assert segment_name(1) == "00000000000000000001.seg"


def test_read_limits_return_at_least_one_record(tmp_path: Path) -> None:
    with SegmentLog(tmp_path) as log:
        log.append(records(1, 10, size=1000))
        assert [s for s, _ in log.read_from(1, max_bytes=10)] == [1]
        assert [s for s, _ in log.read_from(3, max_bytes=2500)] == [3, 4]
        assert [s for s, _ in log.read_from(3, max_records=3)] == [3, 4, 5]


def test_gaps_allowed_but_not_duplicates(tmp_path: Path) -> None:
    with SegmentLog(tmp_path) as log:
        log.append([(5, b"a"), (9, b"b"), (20, b"c")])
        assert log.read_from(6) == [(9, b"b"), (20, b"c")]
        assert log.first == 5
        for bad in ([(20, b"d")], [(19, b"d")], [(21, b"d"), (21, b"e")], [(0, b"")]):
            with pytest.raises(JournalError):
                log.append(bad)
        with pytest.raises(JournalError):
            log.append([(30, b"ok"), (25, b"decreasing")])
        assert log.head == 20  # a refused batch writes nothing
        assert log.read_from(21) == []


def test_oversized_payload_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "MAX_PAYLOAD_BYTES", 100)
    with SegmentLog(tmp_path) as log:
        with pytest.raises(JournalError, match="too large"):
            log.append([(1, b"x" * 101)])
        assert log.head == 0


def test_restart_recovers_everything(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=4096) as log:
        log.append(records(1, 200))
        total = log.total_bytes
    with SegmentLog(tmp_path, segment_bytes=4096) as log:
        assert (log.head, log.first, log.total_bytes) == (200, 1, total)
        assert read_all(log) == records(1, 200)
        log.append(records(201, 250))
    with SegmentLog(tmp_path, segment_bytes=4096, verify_on_open=False) as log:
        assert read_all(log) == records(1, 250)


def test_segments_roll_and_reads_cross_them(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=1000) as log:
        log.append(records(1, 60, size=100))  # 120 bytes a record: 8 per segment
        names = [p.name for p in segment_files(tmp_path)]
        assert names == [segment_name(s) for s in range(1, 61, 8)]
        assert all(p.stat().st_size <= 1000 for p in segment_files(tmp_path))
        for start in (1, 7, 8, 9, 33, 60):
            got = log.read_from(start, max_records=20)
            assert got == records(start, min(start + 19, 60), size=100)
        log.append([(61, b"z" * 5000)])  # bigger than a segment: alone in its own
        assert segment_files(tmp_path)[-1].name == segment_name(61)
        assert log.read_from(61, max_bytes=1) == [(61, b"z" * 5000)]


def test_sparse_index_finds_records_deep_in_a_big_segment(tmp_path: Path) -> None:
    with SegmentLog(tmp_path) as log:
        for first in range(1, 20_001, 1000):
            log.append(records(first, first + 999, size=100))
        assert len(segment_files(tmp_path)) == 1
        for start in (1, 555, 9_999, 19_999):
            assert log.read_from(start, max_records=2) == records(start, start + 1, size=100)


def _append_bytes(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(encode(11, b"q" * 50) + b"q" * 20, id="half-record"),
        pytest.param(encode(11, b"q" * 50)[:7], id="partial-header"),
        pytest.param(b"\0" * 300, id="zeros"),
        pytest.param(encode(11, b"q" * 50)[:-1] + b"!" + b"q" * 50, id="bad-checksum"),
    ],
)
def test_torn_tail_is_cut_and_appends_continue(tmp_path: Path, tail: bytes) -> None:
    with SegmentLog(tmp_path) as log:
        log.append(records(1, 10))
        size = log.total_bytes
    _append_bytes(segment_files(tmp_path)[-1], tail)
    with SegmentLog(tmp_path) as log:
        assert log.head == 10
        assert segment_files(tmp_path)[-1].stat().st_size == size
        log.append(records(11, 12))
    with SegmentLog(tmp_path) as log:
        assert read_all(log) == records(1, 12)


def test_empty_last_segment_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=500) as log:
        log.append(records(1, 20, size=100))
        log.discard_through(20)
        assert log.first == 17
    (tmp_path / segment_name(21)).touch()  # created, then the process died
    with SegmentLog(tmp_path, segment_bytes=500) as log:
        assert log.head == 20
        assert not (tmp_path / segment_name(21)).exists()
        log.append([(21, b"again")])
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    (tmp_path / segment_name(41)).touch()  # the only segment, and empty
    with SegmentLog(tmp_path) as log:
        assert (log.head, log.first) == (40, 41)
    with SegmentLog(tmp_path) as log:
        assert log.head == 40  # remembered through the base file


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_flipped_payload_byte_in_old_segment_is_corrupt(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=1000) as log:
        log.append(records(1, 40, size=100))
    old = segment_files(tmp_path)[1]
    _flip(old, 3 * (HEADER_BYTES + 100) + HEADER_BYTES + 50)  # the 4th record's payload
    with pytest.raises(CorruptRecord, match="checksum"):
        SegmentLog(tmp_path, segment_bytes=1000)
    # Without the full check at open, the read that meets it refuses instead.
    with SegmentLog(tmp_path, segment_bytes=1000, verify_on_open=False) as log:
        assert log.read_from(1, max_records=8) == records(1, 8, size=100)
        with pytest.raises(CorruptRecord):
            log.read_from(9, max_records=8)
        assert log.read_from(13, max_records=1) == records(13, 13, size=100)


def test_flipped_header_byte_in_old_segment_is_corrupt_at_open(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=1000) as log:
        log.append(records(1, 40, size=100))
    _flip(segment_files(tmp_path)[1], 2 * (HEADER_BYTES + 100) + 8)  # a seq field
    with pytest.raises(CorruptRecord):
        SegmentLog(tmp_path, segment_bytes=1000, verify_on_open=False)


def test_damage_in_last_segment_followed_by_valid_records_is_corrupt(tmp_path: Path) -> None:
    with SegmentLog(tmp_path) as log:
        log.append(records(1, 10, size=100))
    last = segment_files(tmp_path)[-1]
    _flip(last, 4 * (HEADER_BYTES + 100) + HEADER_BYTES + 3)
    with pytest.raises(CorruptRecord, match="valid records after"):
        SegmentLog(tmp_path)
    assert last.stat().st_size == 10 * (HEADER_BYTES + 100)  # nothing was cut


def test_bound_drops_oldest_segments(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=1200, max_bytes=3000) as log:
        log.append(records(1, 10, size=100))  # one full segment of 10 records
        assert log.dropped_through == 0
        log.append(records(11, 30, size=100))
        assert log.total_bytes <= 3000
        assert log.first == 11
        assert log.dropped_through == 10
        assert read_all(log) == records(11, 30, size=100)
        log.append([(31, b"x" * 5000)])  # bigger than the bound: stays, alone
        assert (log.first, log.head, log.dropped_through) == (31, 31, 30)
        assert len(segment_files(tmp_path)) == 1


def test_discard_through_drops_whole_segments_only(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=1200) as log:
        log.append(records(1, 35, size=100))  # segments start at 1, 11, 21, 31
        log.discard_through(15)
        assert log.first == 11
        log.discard_through(30)
        assert log.first == 31
        log.discard_through(1000)
        assert log.first == 31  # the segment being written stays
        assert read_all(log) == records(31, 35, size=100)
        assert log.read_from(5, max_records=1) == records(31, 31, size=100)
        assert log.dropped_through == 0
    with SegmentLog(tmp_path, segment_bytes=1200) as log:
        assert (log.first, log.head) == (31, 35)


def test_truncate_after(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=1200) as log:
        log.append(records(1, 35, size=100))
        log.truncate_after(24)
        assert log.head == 24
        assert read_all(log) == records(1, 24, size=100)
        log.append([(25, b"forked"), (26, b"history")])
        assert log.read_from(24) == [*records(24, 24, size=100), (25, b"forked"), (26, b"history")]
        log.truncate_after(10)  # exactly at a segment's end
        assert segment_files(tmp_path)[-1].name == segment_name(1)
        log.append(records(11, 12, size=100))
    with SegmentLog(tmp_path, segment_bytes=1200) as log:
        assert read_all(log) == records(1, 12, size=100)
        log.discard_through(10)
        log.append(records(13, 25, size=100))
        log.discard_through(20)
        assert log.first == 21
        log.truncate_after(5)  # below every record left: empty, head remembered
        assert (log.head, log.first, log.total_bytes) == (5, 6, 0)
    with SegmentLog(tmp_path, segment_bytes=1200) as log:
        assert (log.head, log.read_from(0)) == (5, [])
        log.append([(6, b"six")])
        assert log.read_from(0) == [(6, b"six")]


def test_reset_persists_its_base(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=1200) as log:
        log.append(records(1, 35, size=100))
        log.reset(1000)
        assert (log.head, log.first, log.total_bytes, log.record_count) == (1000, 1001, 0, 0)
        assert segment_files(tmp_path) == []
        with pytest.raises(JournalError):
            log.append([(1000, b"")])
    with SegmentLog(tmp_path) as log:
        assert log.head == 1000
        log.append([(1001, b"a")])
        log.reset(7)  # lower than before is allowed too
    with SegmentLog(tmp_path) as log:
        assert (log.head, log.read_from(0)) == (7, [])


@pytest.mark.parametrize("policy", ["always", "batch", "never"])
def test_fsync_policies_and_synced(tmp_path: Path, policy: segments.FsyncPolicy) -> None:
    with SegmentLog(tmp_path, segment_bytes=300, fsync=policy) as log:
        log.append(records(1, 10, size=100))
        assert log.synced == (10 if policy == "always" else 0)
        log.sync()
        assert log.synced == 10
    with SegmentLog(tmp_path, fsync=policy) as log:
        assert (log.synced, log.head) == (10, 10)


def test_failed_write_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev
    allowed = [0]  # writev calls that still succeed

    def full_disk(fd: int, buffers: list[bytes]) -> int:
        if allowed[0]:
            allowed[0] -= 1
            return real_writev(fd, buffers)
        real_writev(fd, [bytes(buffers[0])[:5]])  # part of a header reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    with SegmentLog(tmp_path, segment_bytes=1200) as log:
        log.append(records(1, 5, size=100))
        monkeypatch.setattr(os, "writev", full_disk)
        with pytest.raises(JournalError, match="No space"):
            log.append(records(6, 7, size=100))
        assert log.head == 5
        assert segment_files(tmp_path)[-1].stat().st_size == 5 * (HEADER_BYTES + 100)
        allowed[0] = 1  # the first segment fills up, the roll to a new one fails
        with pytest.raises(JournalError):
            log.append(records(6, 20, size=100))
        assert log.head == 10
        assert len(segment_files(tmp_path)) == 1  # the new, empty segment went away
        monkeypatch.setattr(os, "writev", real_writev)
        log.append(records(11, 12, size=100))
    with SegmentLog(tmp_path, segment_bytes=1200) as log:
        assert read_all(log) == records(1, 12, size=100)


def test_closed_log_refuses(tmp_path: Path) -> None:
    log = SegmentLog(tmp_path)
    log.close()
    log.close()
    with pytest.raises(JournalError, match="closed"):
        log.append([(1, b"")])
    with pytest.raises(JournalError, match="closed"):
        log.read_from(1)


def test_concurrent_readers_see_a_consistent_log(tmp_path: Path) -> None:
    total = 20_000
    errors: list[BaseException] = []
    progress = threading.Condition()  # readers that caught up wait here, as senders would

    with SegmentLog(tmp_path, segment_bytes=64 * 1024) as log:

        def reader() -> None:
            cursor = 1
            try:
                for _ in range(total):  # bounded: each pass moves on or waits for the writer
                    got = log.read_from(cursor, max_records=500)
                    for seq, data in got:
                        assert seq == cursor
                        assert data == payload(seq)
                        cursor += 1
                    if cursor > total:
                        return
                    if not got:
                        with progress:
                            assert progress.wait_for(
                                lambda c=cursor: log.head >= c,
                                timeout=30,
                            )
                raise AssertionError(f"reader stopped at {cursor}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for thread in threads:
            thread.start()
        for first in range(1, total + 1, 100):
            log.append(records(first, first + 99))
            with progress:
                progress.notify_all()
            if first % 1000 == 1:
                log.sync()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
    assert errors == []


def test_sync_from_another_thread_while_appending(tmp_path: Path) -> None:
    with SegmentLog(tmp_path, segment_bytes=8 * 1024) as log:
        stop = threading.Event()
        failures: list[BaseException] = []

        def syncer() -> None:
            try:
                for _ in range(100_000):
                    if stop.is_set():
                        return
                    log.sync()
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=syncer)
        thread.start()
        for first in range(1, 5001, 50):
            log.append(records(first, first + 49))
        stop.set()
        thread.join(timeout=60)
        log.sync()
        assert failures == []
        assert log.synced == 5000


class SegmentLogModel(RuleBasedStateMachine):
    """Appends, discards, truncations, resets and reopens against a list model."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="stead-seg-"))
        self.log = self._open()
        self.model: list[tuple[int, bytes]] = []
        self.head = 0
        self.discarded = 0  # every record above this must still be readable

    def _open(self) -> SegmentLog:
        return SegmentLog(self.directory, segment_bytes=256, fsync="never")

    @rule(
        gaps=st.lists(st.integers(1, 3), min_size=1, max_size=8),
        sizes=st.lists(st.integers(0, 300), min_size=8, max_size=8),
    )
    def append(self, gaps: list[int], sizes: list[int]) -> None:
        batch = []
        seq = self.head
        for gap, size in zip(gaps, sizes, strict=False):
            seq += gap
            batch.append((seq, payload(seq, size)))
        self.log.append(batch)
        self.model.extend(batch)
        self.head = seq

    @rule(data=st.data())
    def refuse_old_seq(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(0, self.head))
        with pytest.raises(JournalError):
            self.log.append([(seq, b"")])

    @rule(back=st.integers(0, 40))
    def discard(self, back: int) -> None:
        seq = max(self.head - back, 0)
        self.log.discard_through(seq)
        self.discarded = max(self.discarded, seq)

    @precondition(lambda self: self.head > 0)
    @rule(back=st.integers(0, 30))
    def truncate(self, back: int) -> None:
        seq = max(self.head - back, 0)
        self.log.truncate_after(seq)
        self.model = [r for r in self.model if r[0] <= seq]
        self.head = seq
        self.discarded = min(self.discarded, seq)

    @rule(ahead=st.integers(0, 5))
    def reset(self, ahead: int) -> None:
        self.head += ahead
        self.log.reset(self.head)
        self.model = []
        self.discarded = self.head

    @rule()
    def reopen(self) -> None:
        self.log.close()
        self.log = self._open()

    @rule(back=st.integers(0, 50), max_records=st.integers(1, 7), max_bytes=st.integers(0, 900))
    def read(self, back: int, max_records: int, max_bytes: int) -> None:
        seq = max(self.head - back, 0)
        got = self.log.read_from(seq, max_bytes=max_bytes, max_records=max_records)
        stored = [r for r in self.model if r[0] >= max(seq, self.log.first)]
        assert got == stored[: len(got)]
        assert len(got) <= max_records
        if stored:
            assert got, "at least one record when any exists"
            assert (
                len(got) == max_records
                or got == stored
                or (sum(len(p) for _, p in got) + len(stored[len(got)][1]) > max_bytes)
            )

    @invariant()
    def consistent(self) -> None:
        assert self.log.head == self.head
        first = self.log.first
        assert read_all(self.log) == [r for r in self.model if r[0] >= first]
        kept = [r for r in self.model if r[0] > self.discarded]
        assert not kept or first <= kept[0][0]
        assert self.log.record_count == len(read_all(self.log))

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


SegmentLogModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSegmentLogModel = SegmentLogModel.TestCase
