"""Properties of the applier: replay from any commit converges; nothing escapes a root."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stead.errors import ApplyError, OutOfSync
from stead.replication.applier import Applier
from stead.replication.entries import Entry, Op

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from treeutil import snapshot

ROOT = "/srv/lab"
MTIMES = st.integers(min_value=1, max_value=2**62)
EXAMPLES = int(os.environ.get("STEAD_PROPERTY_EXAMPLES", "200"))  # more: a longer hunt
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class Crash(Exception):
    """The process died here."""


class CrashingApplier(Applier):
    """An applier that dies just before its ``crash_at``-th entry of phase 2."""

    def __init__(self, roots: dict[str, Path], crash_at: int) -> None:
        super().__init__(roots)
        self.countdown = crash_at

    def _apply_one(self, *args: object) -> None:
        self.countdown -= 1
        if self.countdown < 0:
            raise Crash
        super()._apply_one(*args)  # type: ignore[arg-type]


# -- (a) replay from any commit point gives the same tree ---------------------------------

names = st.sampled_from(["a", "b", "c"])
paths = st.lists(names, min_size=1, max_size=3).map("/".join)


@st.composite
def actions(draw: st.DrawFn) -> list[Entry]:
    """One change as the active would send it (a FILE may be several parts)."""
    kind = draw(st.sampled_from(list(Op)))
    path = draw(paths)
    mtime = draw(MTIMES)
    mode = draw(st.sampled_from([0o600, 0o644, 0o755]))
    if kind is Op.FILE:
        data = draw(st.binary(max_size=64))
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=2)))
        gap = draw(st.integers(0, 8192))  # parts may leave holes
        size = len(data) + gap + draw(st.integers(0, 100))
        bounds = [0, *cuts, len(data)]
        parts = []
        for index, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            parts.append(
                Entry(
                    Op.FILE,
                    ROOT,
                    path,
                    data=data[lo:hi],
                    offset=lo + (gap if index else 0),
                    first=index == 0,
                    last=index == len(bounds) - 2,
                    size=size,
                    mode=mode,
                    mtime_ns=mtime,
                )
            )
        return parts
    if kind is Op.DELTA:
        blocks = draw(st.lists(st.tuples(st.integers(0, 200), st.binary(max_size=16)), max_size=3))
        size = draw(st.integers(0, 220))
        return [Entry(kind, ROOT, path, blocks=tuple(blocks), size=size, mtime_ns=mtime)]
    if kind is Op.SYMLINK:
        return [Entry(kind, ROOT, path, target=draw(st.sampled_from(["a", "../x", "/etc"])))]
    if kind in (Op.LINK, Op.RENAME):
        return [Entry(kind, ROOT, path, target=draw(paths))]
    if kind in (Op.MKDIR, Op.META):
        return [Entry(kind, ROOT, path, mode=mode, mtime_ns=mtime if kind is Op.META else None)]
    return [Entry(kind, ROOT, path)]


def valid_history(workdir: Path, drawn: list[list[Entry]]) -> list[tuple[int, Entry]]:
    """Keep the actions that the tree as it stands accepts (an active never sends others)."""
    probe = Applier({ROOT: workdir / "probe"})
    records: list[tuple[int, Entry]] = []
    seq = 0
    try:
        for action in drawn:
            numbered = [(seq + 1 + i, entry) for i, entry in enumerate(action)]
            seq += len(action)
            refused: list[Exception] = []
            try:
                probe.apply(numbered, commit=lambda s: None, on_refused=refused_into(refused))
            except OutOfSync:
                continue
            if not refused:
                records.extend(numbered)
    finally:
        probe.close()
    return records


def refused_into(sink: list[Exception]) -> Callable[[int, Entry, Exception], None]:
    return lambda seq, entry, exc: sink.append(exc)


def run_in_batches(
    applier: Applier, records: list[tuple[int, Entry]], size: int, stored: list[int]
) -> None:
    for start in range(0, len(records), size):
        applier.apply(records[start : start + size], commit=stored.append)


@SETTINGS
@given(
    drawn=st.lists(actions(), min_size=1, max_size=25),
    batch=st.integers(1, 8),
    crash_at=st.integers(0, 60),
)
def test_replay_from_last_commit_converges(
    drawn: list[list[Entry]], batch: int, crash_at: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        records = valid_history(work, drawn)
        (work / "reference").mkdir()
        (work / "node").mkdir()
        reference = Applier({ROOT: work / "reference"})
        run_in_batches(reference, records, batch, [])
        reference.close()
        want = snapshot(work / "reference")

        crashing = CrashingApplier({ROOT: work / "node"}, crash_at)
        stored: list[int] = []
        with contextlib.suppress(Crash):
            run_in_batches(crashing, records, batch, stored)
        crashing.close()
        mark = stored[-1] if stored else 0
        restarted = Applier({ROOT: work / "node"})
        restarted.recover()
        run_in_batches(restarted, [r for r in records if r[0] > mark], batch, [])
        restarted.close()
        assert snapshot(work / "node") == want


# -- (b) whatever a peer sends, nothing outside the root changes -------------------------

components = st.sampled_from(
    ["x", "d", "evil", "rel", "up", "..", ".", "", ".stead", "staging", "outside", "f"]
)
hostile_paths = st.tuples(st.booleans(), st.lists(components, min_size=1, max_size=4)).map(
    lambda t: ("/" if t[0] else "") + "/".join(t[1])
)


@st.composite
def hostile_entries(draw: st.DrawFn) -> Entry:
    kind = draw(st.sampled_from(list(Op)))
    root = draw(st.sampled_from([ROOT, ROOT, ROOT, "/etc", "../srv"]))
    path = draw(hostile_paths)
    if kind is Op.SYMLINK:
        target = draw(st.sampled_from(["../outside", "/", "../../outside/f", "evil"]))
    else:
        target = draw(hostile_paths)
    return Entry(
        kind,
        root,
        path,
        target=target,
        data=b"pwned",
        size=5,
        blocks=((0, b"pwned"),),
        mode=0o777,
        uid=draw(st.sampled_from([None, 0, 4242])),
        mtime_ns=draw(st.sampled_from([None, 1])),
        first=draw(st.booleans()),
        last=draw(st.booleans()),
    )


@SETTINGS
@given(entries=st.lists(hostile_entries(), min_size=1, max_size=30))
def test_nothing_outside_the_root_changes(entries: list[Entry]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        outside, root = work / "outside", work / "root"
        (outside / "d").mkdir(parents=True)
        (outside / "f").write_bytes(b"precious")
        (outside / "d" / "x").write_bytes(b"precious too")
        (root / "d").mkdir(parents=True)
        (root / "evil").symlink_to(outside)
        (root / "rel").symlink_to("../outside")
        (root / "d" / "up").symlink_to("../../outside")
        (root / "f").symlink_to(outside / "f")
        before = snapshot(outside, ignore=())
        dir_stats = {p: os.lstat(p) for p in (work, outside, outside / "d", outside / "f")}

        applier = Applier({ROOT: root})
        refused: list[int] = []
        for seq, entry in enumerate(entries, start=1):
            # OutOfSync and ApplyError: the passive would ask for a check or retry later;
            # either way nothing may have escaped.
            with contextlib.suppress(OutOfSync, ApplyError):
                applier.apply([(seq, entry)], on_refused=lambda s, e, x: refused.append(s))
        applier.close()

        assert snapshot(outside, ignore=()) == before
        assert {p: os.lstat(p) for p in dir_stats} == dir_stats
        assert sorted(os.listdir(work)) == ["outside", "root"]
